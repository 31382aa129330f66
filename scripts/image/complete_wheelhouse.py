"""List the requirements a wheelhouse is missing for ANOTHER interpreter (the image's).

Missing means: no wheel of that project, or none whose version satisfies the specifier.

`pip download --python-version` picks wheel tags for the target but evaluates environment
markers against the host (e.g. redis needs ``async-timeout; python_full_version < "3.11.3"``:
true for bookworm's 3.11.2, false for a 3.11.7 host). This script reads every wheel's
``Requires-Dist``, evaluates the markers with the target's environment (a JSON object of PEP 508
marker variables, as printed by ``MARKER_ENV_SNIPPET`` inside the image) and prints, one per
line, each requirement no wheel in the folder satisfies. build.sh downloads those and repeats
until nothing is missing, so a warm wheelhouse needs no network at all.

usage: complete_wheelhouse.py WHEELHOUSE TARGET_ENV_JSON
"""

from __future__ import annotations

import json
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# Runs inside the target image with only the standard library (PEP 508 marker variables).
MARKER_ENV_SNIPPET = """
import json, os, platform, sys
v = sys.implementation.version
print(json.dumps({
    "implementation_name": sys.implementation.name,
    "implementation_version": f"{v.major}.{v.minor}.{v.micro}",
    "os_name": os.name, "platform_machine": platform.machine(),
    "platform_release": platform.release(), "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform}))
"""


def missing_requirements(wheelhouse: Path, target_env: dict[str, str]) -> list[str]:
    """Requirements (as strings) needed on the target whose project has no wheel here."""
    wheels = sorted(wheelhouse.glob("*.whl"))
    have: dict[str, list[Version]] = {}
    for wheel in wheels:
        name, version, _, _ = parse_wheel_filename(wheel.name)
        have.setdefault(name, []).append(version)
    missing: dict[str, str] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            meta_name = next(n for n in archive.namelist()
                             if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            metadata = Parser().parsestr(archive.read(meta_name).decode("utf-8"))
        for line in metadata.get_all("Requires-Dist") or []:
            req = Requirement(line)
            env = {**target_env, "extra": ""}
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonicalize_name(req.name)
            if not any(req.specifier.contains(v, prereleases=True) for v in have.get(name, [])):
                missing[name] = f"{req.name}{req.specifier}"
    return sorted(missing.values())


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    for requirement in missing_requirements(Path(argv[0]), json.loads(argv[1])):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
