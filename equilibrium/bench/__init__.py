"""``equilibrium bench``: compare routing policies on a real local fleet, in one run.

- :mod:`equilibrium.bench.scenarios` — the scenario interface and the registry (name -> module);
- :mod:`equilibrium.bench.harness` — building blocks every scenario uses: drive open-loop load
  through sidecars, sample their state;
- :mod:`equilibrium.bench.report` — machine and command header, Markdown and JSON output;
- the five scenarios: :mod:`equilibrium.bench.slow_pod`, :mod:`equilibrium.bench.proxy_overhead`,
  :mod:`equilibrium.bench.herding`, and ``retry-flood`` and ``overload-bids``, both defined in
  :mod:`equilibrium.bench.policing` (registered through :mod:`equilibrium.bench.retry_flood`
  and :mod:`equilibrium.bench.overload_bids`);
- :mod:`equilibrium.bench.cli` — the command line.
"""
