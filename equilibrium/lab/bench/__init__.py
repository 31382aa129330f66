"""``equilibrium bench``: compare routing policies on a real local fleet, in one run.

- :mod:`equilibrium.lab.bench.scenarios` — the scenario interface and the registry (name -> module);
- :mod:`equilibrium.lab.bench.harness` — building blocks every scenario uses: drive open-loop load
  through sidecars, sample their state;
- :mod:`equilibrium.lab.bench.report` — machine and command header, Markdown and JSON output;
- :mod:`equilibrium.lab.bench.slow_pod`, :mod:`equilibrium.lab.bench.proxy_overhead`,
  :mod:`equilibrium.lab.bench.herding`, :mod:`equilibrium.lab.bench.policing` — the scenarios;
- :mod:`equilibrium.lab.bench.cli` — the command line.
"""
