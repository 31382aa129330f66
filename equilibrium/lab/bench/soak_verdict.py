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
- **open files**: a leak is a count that keeps rising; a keep-alive pool that grew for a burst
  and keeps its connections is a step and then a plateau (an inbound sidecar keeps about as
  many connections to its app as its concurrency limit lets through, and that limit grows with
  the app's capacity; an outbound sidecar keeps the connections its app opened to it in a
  burst). "More" below means more than ``max_growth`` *and* more than ``fd_slack``
  descriptors. The run fails when the last window's median is more than both the first
  window's after the warm-up (as for memory) and the highest median of any earlier window of
  the same width after the warm-up (a new high at the end: a step late in the run, or a steep
  ramp); or when the medians of the four quarters after the warm-up rise quarter after
  quarter, each by more than ``fd_slack / 8``, and the last is more than the first (a slow
  ramp). A plateau reached mid-run passes.
- **cooperative failures**: any failed request of a cooperative caller fails the run (what
  counts as failed is :mod:`equilibrium.lab.bench.soak_load`'s rule).
- **processes**: a checked process that exited during the run fails it.
"""

from __future__ import annotations

import itertools
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
    fds_peak_before: float | None = None
    """The highest median of a window of the same width after the warm-up, before the last."""
    fds_quarters: tuple[float, ...] = ()
    """Medians of the four quarters after the warm-up (empty when one had no sample)."""

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

    after = [s for s in series if a0 <= s.t < b0]
    peaks = []
    for i, start in enumerate(after):  # windows of the same width, starting at each sample
        inside = [x.fds for x in after[i:] if x.t < start.t + (a1 - a0)]
        if len(inside) >= rules.min_samples and start.t + (a1 - a0) <= b0:
            peaks.append(float(statistics.median(inside)))
    quarter = (duration - a0) / 4
    quarters = [[x.fds for x in series if a0 + k * quarter <= x.t < a0 + (k + 1) * quarter
                 or (k == 3 and x.t == duration)] for k in range(4)]
    return Growth(med(first, "rss_kib"), med(last, "rss_kib"), med(first, "fds"),
                  med(last, "fds"), len(first), len(last),
                  max(peaks) if peaks and enough else None,
                  tuple(float(statistics.median(q)) for q in quarters) if all(quarters)
                  else ())


def _more(after: float, before: float, rules: Rules) -> bool:
    """``after`` is more than ``before`` by ``max_growth`` and by ``fd_slack``."""
    return after > before * (1 + rules.max_growth) and after - before > rules.fd_slack


def fd_reason(name: str, g: Growth, rules: Rules) -> str | None:
    """Why ``g``'s open files fail the run (module docstring), or None."""
    if g.fds_first is None or g.fds_last is None:
        return None
    if _more(g.fds_last, g.fds_first, rules) and (
            g.fds_peak_before is None or _more(g.fds_last, g.fds_peak_before, rules)):
        return (f"{name}: open files grew {g.fds_last / max(g.fds_first, 1) - 1:+.1%} after "
                f"warm-up ({g.fds_first:g} → {g.fds_last:g}, medians), above any earlier "
                f"level ({g.fds_peak_before if g.fds_peak_before is not None else '-'})")
    q = g.fds_quarters
    if len(q) == 4 and all(b - a > rules.fd_slack / 8 for a, b in itertools.pairwise(q)) \
            and _more(q[-1], q[0], rules):
        return (f"{name}: open files kept rising after warm-up (quarter medians "
                f"{', '.join(f'{x:g}' for x in q)})")
    return None


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
        reason = fd_reason(name, g, rules)
        if reason is not None:
            verdict.reasons.append(reason)
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
