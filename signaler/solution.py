"""What the signaler's routing programs return, and how they fail.

Owns: :class:`CESolution` (a distribution over token configurations with its verified CE gap),
the :class:`SolverError` family, and the rule for which endpoints count as failing. Shared by
:mod:`signaler.lp` and :mod:`signaler.system_optimum`. Pure numerics: no Redis, no asyncio.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from signaler.latency_model import LatencyModel
from signaler.routing_game import ce_gap, configuration_costs, latency_table


class SolverError(RuntimeError):
    """A routing program could not be solved (solver failure, infeasible, unbounded, ...).

    The signaler keeps its previous recommendation when this is raised; no program ever returns
    ``None`` instead.
    """


class NoCapacityError(SolverError):
    """Every endpoint is failing: there is demand but no capacity to plan it onto."""


def usable_endpoints(
    models: Sequence[LatencyModel], demand: float, failed_mu_ratio: float
) -> np.ndarray:
    """Indices of endpoints that are not failing.

    An endpoint is failing when its capacity ``mu`` is below ``failed_mu_ratio`` times the larger
    of the best endpoint's capacity and the demand (scale-free: the same rule for req/s or
    req/ms). Failing endpoints get no tokens; they are still priced when the CE gap is checked.
    Raises :class:`NoCapacityError` when all are failing.
    """
    mus = np.array([model.mu for model in models], dtype=float)
    threshold = failed_mu_ratio * max(float(mus.max()), demand)
    working = np.flatnonzero(mus >= threshold)
    if working.size == 0:
        raise NoCapacityError(
            f"all {len(models)} endpoints are failing: capacities {mus.tolist()} are below "
            f"{failed_mu_ratio:g} x demand {demand:g}"
        )
    return working


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class CESolution:
    """A distribution over configurations of tokens on endpoints.

    ``configurations`` is ``(m, k)`` integer counts (each row sums to the number of tokens),
    ``probabilities`` ``(m,)`` sums to 1 (rows with negligible mass are dropped). ``objective`` is
    the expected total latency ``sum_c p(c) sum_j c_j l_j(c_j lam)``; ``ce_gap`` the largest
    expected gain one token gets from deviating from its recommendation, recomputed from the
    returned distribution (never taken from the solver). ``status`` is one of ``"optimal"``,
    ``"feasible"`` (a CE from column generation, not proven the best),
    ``"optimal_inaccurate"``, ``"trivial"`` (no choice to make) or ``"overloaded"`` (demand above
    every knee; see :mod:`signaler.system_optimum`); all are usable plans. ``method`` is
    ``"configuration-lp"``, ``"column-generation"``, ``"system-optimum"`` or ``"joint-profile-lp"``.
    """

    configurations: np.ndarray
    probabilities: np.ndarray
    objective: float
    status: str
    ce_gap: float
    solve_seconds: float
    n_variables: int
    n_constraints: int
    method: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "configurations", _read_only(self.configurations))
        object.__setattr__(self, "probabilities", _read_only(self.probabilities))

    @property
    def n_tokens(self) -> int:
        return int(self.configurations[0].sum())

    @property
    def n_endpoints(self) -> int:
        return int(self.configurations.shape[1])

    def marginal(self) -> np.ndarray:
        """Expected number of tokens on each endpoint, shape ``(k,)``."""
        marginal: np.ndarray = self.probabilities @ self.configurations
        return marginal

    @classmethod
    def from_distribution(
        cls,
        configurations: np.ndarray,
        probabilities: np.ndarray,
        models: Sequence[LatencyModel],
        token_load: float,
        *,
        status: str,
        method: str,
        started: float,
        n_variables: int,
        n_constraints: int,
        prune_below: float = 1e-12,
    ) -> CESolution:
        """Clean a solver's distribution (clip, drop negligible rows, renormalise), then price it
        and verify its CE gap. ``started`` is a ``time.perf_counter()`` reading."""
        p = np.maximum(np.asarray(probabilities, dtype=float), 0.0)
        if not np.all(np.isfinite(p)) or p.sum() <= 0:
            raise SolverError("solver returned no probability mass")
        keep = p > prune_below * p.max()
        configurations, p = configurations[keep], p[keep] / p[keep].sum()
        n = int(configurations[0].sum())
        table = latency_table(models, n + 1, token_load)
        return cls(
            configurations=configurations.astype(np.int64),
            probabilities=p,
            objective=float(p @ configuration_costs(configurations, table)),
            status=status,
            ce_gap=ce_gap(configurations, p, table),
            solve_seconds=time.perf_counter() - started,
            n_variables=n_variables,
            n_constraints=n_constraints,
            method=method,
        )

    @classmethod
    def single(
        cls,
        counts: np.ndarray,
        models: Sequence[LatencyModel],
        token_load: float,
        status: str,
        method: str,
        started: float,
        n_variables: int,
        n_constraints: int,
    ) -> CESolution:
        """A deterministic plan: one configuration with probability 1."""
        return cls.from_distribution(
            np.asarray(counts, dtype=np.int64).reshape(1, -1),
            np.ones(1),
            models,
            token_load,
            status=status,
            method=method,
            started=started,
            n_variables=n_variables,
            n_constraints=n_constraints,
        )
