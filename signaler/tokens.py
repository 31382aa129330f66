"""Tokens: turning sidecars' traffic into the LP's players, and a sampled plan into private weights.

Owns: quantising each sidecar's demand into whole tokens (:func:`quantise_demand`), drawing one
configuration from a :class:`~signaler.solution.CESolution` (:func:`sample_configuration`), and
dealing that configuration's tokens out to the sidecars (:func:`assign_tokens`, and across epochs
:func:`steady_deal`, which moves as few tokens as the new configuration forces). Pure numerics:
no Redis, no asyncio; every random draw comes from the ``numpy.random.Generator`` passed in.

Why the deal is shuffled. The LP's incentive rows assume that, given a configuration ``c``, each
token is told endpoint ``j`` with probability ``c_j / n`` and learns nothing else -- the mediator of
a correlated equilibrium (Aumann 1974) sends each player only its own recommendation. Dealing the
configuration's tokens to sidecars in a uniformly random order realises exactly that, and each
sidecar is sent only its own share.

Why a re-deal moves as few tokens as it can. Re-dealing from scratch every epoch would change
every sidecar's weights every epoch even when the configuration barely changed, and each change
costs the sidecars a ramp (their herd guard moves traffic gradually). :func:`steady_deal` keeps
each token where it was unless its endpoint now has more tokens than the configuration gives it;
the surplus tokens to move are chosen uniformly at random among the tokens on that endpoint, and
the freed tokens fill the deficits in a uniformly random order. Every step treats tokens
symmetrically, so if the previous deal was exchangeable (law unchanged by permuting the tokens,
as a uniform first deal is), the new one is too: each token is still told endpoint ``j`` with
probability ``c_j / n`` given the configuration ``c``, which is what the LP's incentive rows
assume. A sidecar that also remembers its past recommendations may learn more than its current
one (tokens that stayed hint that the configuration did too); the indifference margin of the
sidecars and the plan's stability rails accept that epsilon. Each sidecar is still sent only
its own share.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np

from signaler.solution import CESolution


def quantise_demand(rates: Mapping[str, float], total_tokens: int) -> dict[str, int]:
    """Split ``total_tokens`` over sidecars in proportion to their traffic ``rates``.

    Largest-remainder (Hamilton) apportionment, with one extra rule: every sidecar with a positive
    rate gets at least one token (so it receives a recommendation); the tokens that rule adds are
    taken back from the sidecars whose counts most exceed their quotas. Sidecars with rate 0 get 0.
    Ties break by sidecar id, so the result is deterministic.

    Raises ``ValueError`` for NaN/inf/negative rates, a negative total, or more sidecars with
    demand than tokens.
    """
    if isinstance(total_tokens, bool) or total_tokens < 0:
        raise ValueError(f"total_tokens must be >= 0, got {total_tokens!r}")
    for sidecar, rate in rates.items():
        if type(rate) is float and 0.0 <= rate < math.inf:  # the common case, without the ABC
            continue
        is_number = isinstance(rate, numbers.Real) and not isinstance(rate, bool)
        if not (is_number and math.isfinite(rate) and rate >= 0):
            raise ValueError(f"rate for sidecar {sidecar!r} must be finite and >= 0, got {rate!r}")
    result = {sidecar: 0 for sidecar in rates}
    active = sorted(sidecar for sidecar, rate in rates.items() if rate > 0)
    if not active:
        return result
    if len(active) > total_tokens:
        raise ValueError(
            f"{len(active)} sidecars have demand but only {total_tokens} tokens exist; "
            "raise the token count"
        )
    total_rate = math.fsum(rates[s] for s in active)
    quota = {s: rates[s] / total_rate * total_tokens for s in active}
    counts = {s: max(math.floor(quota[s]), 1) for s in active}
    while sum(counts.values()) > total_tokens:
        # Take back from the sidecar left least short of its quota after losing one token.
        donor = min(
            (s for s in active if counts[s] > 1), key=lambda s: (quota[s] - (counts[s] - 1), s)
        )
        counts[donor] -= 1
    while sum(counts.values()) < total_tokens:
        receiver = min(active, key=lambda s: (counts[s] - quota[s], s))
        counts[receiver] += 1
    result.update(counts)
    return result


def sample_configuration(solution: CESolution, rng: np.random.Generator) -> np.ndarray:
    """Draw one configuration (token counts per endpoint, shape ``(k,)``) from ``solution``."""
    index = int(rng.choice(solution.probabilities.size, p=solution.probabilities))
    return np.array(solution.configurations[index], dtype=np.int64)


def assign_tokens(
    counts: np.ndarray | list[int],
    demands: Mapping[str, int],
    rng: np.random.Generator,
) -> dict[str, dict[int, float]]:
    """Deal the configuration ``counts`` out to sidecars, each getting ``demands[sidecar]`` tokens.

    Returns, per sidecar, its private weights ``{endpoint index: share}`` (its tokens' endpoints,
    normalised to sum to 1; endpoints it got no token on are omitted). The tokens are shuffled with
    ``rng`` before dealing, so a sidecar's share is a uniformly random sub-multiset of the
    configuration. A sidecar with zero demand gets the configuration's overall mix (or an empty
    dict when the configuration is empty), so it has a plan for its first requests.

    Raises ``ValueError`` if the demands do not add up to the configuration's token count or any
    count/demand is negative.
    """
    counts = _check_deal(counts, demands)
    total = int(counts.sum())
    endpoints = rng.permutation(np.repeat(np.arange(counts.size), counts))
    mix = {int(j): int(c) / total for j, c in enumerate(counts) if c > 0} if total else {}
    weights: dict[str, dict[int, float]] = {}
    position = 0
    for sidecar in sorted(demands):
        demand = int(demands[sidecar])
        if demand == 0:
            weights[sidecar] = dict(mix)
            continue
        share = np.bincount(endpoints[position : position + demand], minlength=counts.size)
        position += demand
        weights[sidecar] = {int(j): int(c) / demand for j, c in enumerate(share) if c > 0}
    return weights


def steady_deal(
    counts: np.ndarray | list[int],
    demands: Mapping[str, int],
    previous: Mapping[str, Mapping[int, int]],
    rng: np.random.Generator,
) -> dict[str, dict[int, int]]:
    """Deal ``counts`` to sidecars keeping each sidecar's tokens where ``previous`` had them as
    far as the configuration allows (see the module docstring).

    ``previous[sidecar]`` maps endpoint index -> tokens it held there (indices outside
    ``counts`` and sidecars absent from ``demands`` are dropped; a sidecar missing from
    ``previous`` starts with no holdings). A sidecar holding more tokens than its new demand
    gives back a uniformly random subset; one holding fewer gets free tokens. Then only the
    surplus over ``counts[j]`` on each endpoint ``j`` moves -- the fewest moves any deal with
    these holdings can make -- and the moved and free tokens fill the deficits in random order.

    Returns, per sidecar of ``demands``, ``{endpoint index: tokens}`` (zero entries omitted).
    Raises ``ValueError`` like :func:`assign_tokens` for bad counts or demands.
    """
    counts = _check_deal(counts, demands)
    k = counts.size
    owners: list[str] = []
    places: list[int] = []  # endpoint index per token, -1 while free
    for sidecar in sorted(demands):
        demand = int(demands[sidecar])
        held = [
            int(j) for j, c in sorted((previous.get(sidecar) or {}).items())
            if 0 <= int(j) < k for _ in range(max(int(c), 0))
        ]
        if len(held) > demand:
            keep = rng.choice(len(held), size=demand, replace=False)
            held = [held[i] for i in sorted(int(i) for i in keep)]
        held += [-1] * (demand - len(held))
        owners += [sidecar] * demand
        places += held
    place = np.array(places, dtype=np.int64)
    for j in range(k):
        on_j = np.flatnonzero(place == j)
        surplus = on_j.size - int(counts[j])
        if surplus > 0:
            place[rng.choice(on_j, size=surplus, replace=False)] = -1
    free = np.flatnonzero(place == -1)
    held_now = np.bincount(place[place >= 0], minlength=k)
    slots = np.repeat(np.arange(k), counts - held_now)
    place[free] = rng.permutation(slots)
    deal: dict[str, dict[int, int]] = {sidecar: {} for sidecar in demands}
    for sidecar, j in zip(owners, place.tolist(), strict=True):
        deal[sidecar][j] = deal[sidecar].get(j, 0) + 1
    return deal


def _check_deal(counts: np.ndarray | list[int], demands: Mapping[str, int]) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0):
        raise ValueError(f"counts must be a 1-D array of non-negative ints, got {counts!r}")
    for sidecar, demand in demands.items():
        if isinstance(demand, bool) or not isinstance(demand, int | np.integer) or demand < 0:
            raise ValueError(f"demand for sidecar {sidecar!r} must be an int >= 0, got {demand!r}")
    total = int(counts.sum())
    if sum(int(d) for d in demands.values()) != total:
        raise ValueError(
            f"demands add up to {sum(int(d) for d in demands.values())} tokens but the "
            f"configuration has {total}"
        )
    return counts.astype(np.int64)
