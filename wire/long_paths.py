"""Declared long requests: the path prefixes an operator names as long polls and watches.

A long poll's answer comes when something happens or its wait runs out, seconds later: that
time is the request's, not the server's. Both listeners can be told which requests are such:
the inbound side keeps them out of the app's concurrency limit (``policing.long_paths``,
docs/policing.md, "Congestion"), the outbound side keeps their length out of what it learns
of the upstream's endpoints (an upstream's ``long_paths``, docs/routing.md, "Long polls").
In Kubernetes both are an annotation ``equilibrium.io/long-paths`` in the comma form
(:func:`parse_long_path_list`): a Service's, read by its callers' discovery, and a pod's, which
the injector passes to the pod's sidecar as ``--inbound-long-paths``. Both sides match the
same way, here: a request's path (its query left out) is one of the prefixes or below one by
whole segments (``/watch`` covers ``/watch/pods``, not ``/watchdog``), and a path with ``.``
or ``..`` segments (or a dot file), also percent-encoded (``%2e``), never matches, for an app
may resolve it to somewhere else.
"""

from __future__ import annotations

from typing import Any

MAX_LONG_PATHS = 64
"""Prefixes one declaration may list."""
ANNOTATION = "equilibrium.io/long-paths"
"""The Kubernetes annotation of a declaration in the comma form, on a Service (for its
callers) or on a pod (for its own sidecar)."""


def is_path(value: Any) -> bool:
    """An absolute request path of printable ASCII without spaces, at most 256 characters."""
    return (isinstance(value, str) and value.startswith("/") and len(value) <= 256
            and value.isascii() and value.isprintable() and " " not in value)


def prefix_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a declared prefix, or None: it must be a path (:func:`is_path`)
    that some request can be below (:func:`under_long_path` matches no target with a dot
    segment, and a target's query is left out) and not the root, which would declare every
    request long."""
    if not is_path(value):
        return "not an absolute path of printable ASCII without spaces, 256 characters at most"
    if not value.rstrip("/"):
        return "the root would declare every request long"
    if "?" in value or "#" in value:
        return "a prefix is a path, without a query or a fragment"
    if "/." in value or "%2e" in value.lower():
        return "a path with dot segments (also as %2e) is never matched"
    return None


def parse_long_paths(value: Any, what: str) -> tuple[str, ...]:
    """A list of at most :data:`MAX_LONG_PATHS` prefixes (:func:`prefix_problem`); ValueError
    naming ``what`` and the first bad one otherwise."""
    expected = (f"{what}: expected a list of at most {MAX_LONG_PATHS} path prefixes such as "
                "/watch or /pkg.Service/Watch")
    if not isinstance(value, list) or len(value) > MAX_LONG_PATHS:
        raise ValueError(expected)
    for item in value:
        if (problem := prefix_problem(item)) is not None:
            shown = repr(item) if len(repr(item)) <= 80 else repr(item)[:77] + "..."
            raise ValueError(f"{expected}; {shown}: {problem}")
    return tuple(value)


def parse_long_path_list(text: str, what: str) -> tuple[str, ...]:
    """The comma form (``"/watch, /v1/poll"``) of an annotation, flag or environment variable:
    :func:`parse_long_paths` of its items, blanks left out; ValueError naming ``what``."""
    return parse_long_paths([p.strip() for p in text.split(",") if p.strip()], what)


def under_long_path(target: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a request target's path is one of ``prefixes`` or below one (module
    docstring)."""
    if not prefixes:
        return False
    path = target.split("?", 1)[0]
    if "/." in path or "%2e" in path.lower():  # /./, /../, a dot file, or one encoded:
        return False  # not a path to trust a prefix of
    return any(path == prefix or path.startswith(prefix.rstrip("/") + "/")
               for prefix in prefixes)
