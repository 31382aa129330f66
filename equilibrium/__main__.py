"""Allow ``python -m equilibrium``."""

import sys

from equilibrium.cli import main

sys.exit(main())
