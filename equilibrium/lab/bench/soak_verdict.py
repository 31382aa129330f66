"""The ``soak`` scenario's verdict: from resource samples and failure counts to pass or fail.

Pure: no process, clock or file. :mod:`equilibrium.lab.bench.soak` gathers the samples and
hands them here; the unit tests give hand-made series.

The rules (docs/benchmarks.md, "soak", repeats them):

- **memory**: for every checked process (every sidecar and the signaler), the samples of the
  first ``warmup`` share of the run are ignored; the growth is the median RSS of the samples in
  the last ``window`` share of the run over the median RSS of the samples in the first
  ``window`` share after the warm-up, minus one. More than ``max_growth`` (10 %) fails. Medians
  of several samples, so one garbage-collection peak or one burst of buffers neither fails nor
  hides a trend. A process with fewer than ``min_samples`` samples in either window fails too:
  a verdict without evidence is no pass.
- **open files**: the same windows; more than ``max_growth`` *and* more than ``fd_slack`` more
  descriptors fails. Keep-alive pools are no leak: an inbound sidecar keeps about as many
  connections to its app as its concurrency limit lets through, and that limit grows with the
  app's capacity (tens at the soak's slow pod; its 60-s run in CI once read 81 → 102).
- **cooperative failures**: any failed request of a cooperative caller fails the run (what
  counts as failed is :mod:`equilibrium.lab.bench.soak_load`'s rule).
- **processes**: a checked process that exited during the run fails it.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ResourceSample:
    """One reading of one process, ``t`` seconds after the load started."""

    t: float
    rss_kib: float
    fds: int


@dataclass(frozen=True, slots=True)
class Rules:
    warmup: float = 0.20
    window: float = 0.10
    max_growth: float = 0.10
    fd_slack: int = 64
    min_samples: int = 3


@dataclass(frozen=True, slots=True)
class Growth:
    """One process's before/after medians (``None`` when a window had too few samples)."""

    rss_first: float | None
    rss_last: float | None
    fds_first: float | None
    fds_last: float | None
    samples_first: int
    samples_last: int

    @property
    def rss_growth(self) -> float | None:
        if not self.rss_first or self.rss_last is None:
            return None
        return self.rss_last / self.rss_first - 1.0

    @property
    def fd_growth(self) -> float | None:
        if not self.fds_first or self.fds_last is None:
            return None
        return self.fds_last / self.fds_first - 1.0


@dataclass(slots=True)
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    growth: dict[str, Growth] = field(default_factory=dict)


def windows(duration: float, rules: Rules) -> tuple[tuple[float, float], tuple[float, float]]:
    """The first window after the warm-up and the last window of the run, in seconds."""
    start = rules.warmup * duration
    width = rules.window * duration
    return (start, start + width), (duration - width, duration)


def growth_of(series: Sequence[ResourceSample], duration: float, rules: Rules) -> Growth:
    (a0, a1), (b0, b1) = windows(duration, rules)
    first = [s for s in series if a0 <= s.t < a1]
    last = [s for s in series if b0 <= s.t <= b1]
    enough = len(first) >= rules.min_samples and len(last) >= rules.min_samples

    def med(xs: Sequence[ResourceSample], attr: str) -> float | None:
        return float(statistics.median(getattr(s, attr) for s in xs)) if enough else None

    return Growth(med(first, "rss_kib"), med(last, "rss_kib"), med(first, "fds"),
                  med(last, "fds"), len(first), len(last))


def judge(
    series: Mapping[str, Sequence[ResourceSample]],
    duration: float,
    cooperative_failures: Mapping[str, Mapping[str, int]],
    exited: Sequence[str] = (),
    rules: Rules = Rules(),
) -> Verdict:
    """Pass or fail, with every reason it failed (an empty list when it passed).

    ``series``: the checked processes' samples; ``cooperative_failures``: per cooperative
    caller, failed requests by kind; ``exited``: checked processes that died during the run.
    """
    verdict = Verdict(passed=True)
    for name in sorted(series):
        g = growth_of(series[name], duration, rules)
        verdict.growth[name] = g
        rss = g.rss_growth
        if rss is None:
            verdict.reasons.append(
                f"{name}: too few samples to judge memory ({g.samples_first} after warm-up, "
                f"{g.samples_last} at the end; need {rules.min_samples} each)")
            continue
        if rss > rules.max_growth and g.rss_first is not None:
            verdict.reasons.append(
                f"{name}: RSS grew {rss:+.1%} after warm-up ({g.rss_first / 1024:.1f} → "
                f"{(g.rss_last or 0) / 1024:.1f} MiB, medians), limit {rules.max_growth:+.0%}")
        fds = g.fd_growth
        if (fds is not None and fds > rules.max_growth and g.fds_last is not None
                and g.fds_first is not None and g.fds_last - g.fds_first > rules.fd_slack):
            verdict.reasons.append(
                f"{name}: open files grew {fds:+.1%} after warm-up ({g.fds_first:g} → "
                f"{g.fds_last:g}, medians)")
    for name in exited:
        verdict.reasons.append(f"{name}: exited during the run")
    for caller in sorted(cooperative_failures):
        kinds = {k: n for k, n in cooperative_failures[caller].items() if n}
        if kinds:
            listed = ", ".join(f"{n} × {k}" for k, n in sorted(kinds.items(),
                                                              key=lambda kv: -kv[1]))
            verdict.reasons.append(
                f"cooperative caller {caller}: {sum(kinds.values())} failed requests ({listed})")
    verdict.passed = not verdict.reasons
    return verdict
