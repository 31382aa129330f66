"""The ``equilibrium`` command: one entry point, one subcommand per component.

Each component owns its own arguments: a module listed in ``SUBCOMMANDS`` exposes
``register(subparsers)``, which adds its subparser and sets ``func`` (a callable taking the
parsed namespace and returning an exit code). Modules are imported only when needed, so
``equilibrium sidecar`` never pays for cvxpy or matplotlib.

The lab's commands (``LAB_COMMANDS``: the demo and the benchmarks, :mod:`equilibrium.lab`) need
the ``lab`` extra; without it they print how to install it and exit 2, before importing
anything of the lab. ``sidecar``, ``signaler``, ``injector`` and ``init`` never need it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import MutableMapping, Sequence

# subcommand -> (module that registers it, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sidecar": ("sidecar.cli", "run the proxy beside an app"),
    "sidecar-hook": ("sidecar.hooks", "container lifecycle hooks of an injected sidecar"),
    "signaler": ("signaler.cli", "run the correlated-equilibrium signaler"),
    "injector": ("injector.cli", "run the Kubernetes sidecar-injector webhook"),
    "init": ("injector.init_cli", "install the transparent-interception iptables rules"),
    "demo": ("equilibrium.lab.demo.cli", "run a local mesh with a bad pod and watch traffic shift"),
    "bench": ("equilibrium.lab.bench.cli", "compare routing policies on a real local fleet"),
    "simulate": ("equilibrium.lab.simulate.cli", "simulate many sidecars in virtual time"),
}
LAB_COMMANDS = frozenset({"demo", "bench", "simulate"})
"""Subcommands that need the ``lab`` extra (:mod:`equilibrium.lab.extra`)."""


MATH_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Thread counts of numpy's linear-algebra libraries, read once when numpy is first loaded."""


def one_math_thread(environ: MutableMapping[str, str]) -> None:
    """Make numpy's BLAS single-threaded unless the operator chose otherwise.

    Every component is one event loop whose matrices are small (a signaler's summaries, a
    sidecar's weights); OpenBLAS would start a thread per core that spins between calls and
    competes with the app on the same node. The simulator measured its small solves 30x
    slower with those threads on a shared 2-core machine (docs/simulate.md). Called before
    any subcommand's module is imported, so before numpy is loaded."""
    for name in MATH_THREAD_VARIABLES:
        environ.setdefault(name, "1")


CREATED_SERIES_VARIABLE = "PROMETHEUS_DISABLE_CREATED_SERIES"
"""prometheus_client's switch for the ``*_created`` series (one per counter, histogram and
summary child: a quarter of a sidecar's samples, read by no rule or dashboard here)."""


def no_created_series(environ: MutableMapping[str, str]) -> None:
    """Leave out the ``*_created`` series, as Linkerd's and Envoy's exposition do, unless the
    operator set :data:`CREATED_SERIES_VARIABLE` (``False`` brings them back)."""
    environ.setdefault(CREATED_SERIES_VARIABLE, "True")
    if environ[CREATED_SERIES_VARIABLE].strip().lower() == "true":
        from prometheus_client import disable_created_metrics

        disable_created_metrics()


def _wanted(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="equilibrium",
        description="Equilibrium: a game-theoretic sidecar proxy for microservices.",
    )
    parser.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = _wanted(argv)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if wanted == name:
            module = importlib.import_module(module_name)
            module.register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _subcommand_parser(parser: argparse.ArgumentParser,
                       argv: Sequence[str]) -> argparse.ArgumentParser | None:
    """The innermost (sub)subcommand's parser that ``argv`` names (``injector controller``
    gives the controller's), None when it names none."""
    chosen: argparse.ArgumentParser | None = None
    words = [a for a in argv if not a.startswith("-")]
    current = parser
    for word in words:
        subparsers = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or word not in subparsers[0].choices:
            break
        current = chosen = subparsers[0].choices[word]
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    one_math_thread(os.environ)
    no_created_series(os.environ)
    wanted = _wanted(args_list)
    if wanted in LAB_COMMANDS:
        from equilibrium.lab.extra import missing_message

        message = missing_message(wanted)
        if message is not None:
            print(message, file=sys.stderr)
            return 2
    parser = build_parser(args_list)
    args, unknown = parser.parse_known_args(args_list)
    if unknown:  # told by the subcommand's parser, with its usage (argparse's own says the
        # top level's, which names none of the subcommand's options)
        chosen = _subcommand_parser(parser, args_list)
        (chosen or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code = int(func(args) or 0)
        sys.stdout.flush()  # a reader that left shows here, not as exit 120 at shutdown
        return code
    except BrokenPipeError:  # `equilibrium init --dry-run | head`: the reader had enough
        # (Python's own advice: send the rest of the output nowhere, so that flushing
        # stdout at exit raises nothing more, and exit non-zero as a cut pipe does)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
