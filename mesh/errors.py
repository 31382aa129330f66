"""The one error for a setting that cannot work, shared by every command line.

Owns :class:`ConfigError`. The sidecar (:mod:`sidecar.config`, its runner), the signaler
(:mod:`signaler.cli`) and the injector raise it while reading flags, the environment and config
files; each command prints the message and exits 2. :class:`mesh.address.AddressError` (not
a ``HOST:PORT``) and :class:`injector.config.AnnotationError` (a pod annotation the injector
cannot honour) are kinds of it. It lives here, at the bottom of the layers, because those
services must not import each other. Pure: no I/O.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting is missing, malformed or cannot work with the others; the message names the
    setting and where it came from, and is meant for a human."""
