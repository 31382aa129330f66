"""``equilibrium bench``: compare routing policies on a real local fleet, in one run.

- :mod:`equilibrium.lab.bench.scenarios` — the scenario interface and the registry (name ->
  module);
- :mod:`equilibrium.lab.bench.harness` — building blocks every scenario uses: drive open-loop
  load through sidecars, sample their state;
- :mod:`equilibrium.lab.bench.report` — machine and command header, Markdown and JSON output;
- the scenarios: :mod:`equilibrium.lab.bench.slow_pod`,
  :mod:`equilibrium.lab.bench.proxy_overhead`, :mod:`equilibrium.lab.bench.herding`,
  ``retry-flood`` and ``overload-bids`` (both defined in :mod:`equilibrium.lab.bench.policing`,
  registered through :mod:`equilibrium.lab.bench.retry_flood` and
  :mod:`equilibrium.lab.bench.overload_bids`), and ``demo`` (:mod:`equilibrium.lab.demo`);
- :mod:`equilibrium.lab.bench.cli` — the command line.
"""
