"""The sidecar's settings: one validated ``SidecarConfig`` built from four layers.

Owns the parsing and validation of every setting (listen addresses, upstreams, strategy,
policy, id, drain timeout, inbound side, signaling, transparent interception and Kubernetes
discovery) and the precedence rule: command-line flags > environment variables > config file
(YAML or JSON) > defaults. The command line (:mod:`sidecar.cli`) hands its flags in; the runner
(:mod:`sidecar.runner`) builds the whole process from the result. Nothing here opens a socket
or starts a task; the runner re-reads a ``ConfigSource`` on reload and gets either a new
config or a ``ConfigError`` whose message is fit for a human.

Transparent interception and discovery (``transparent``, ``discovery``,
``discovery_namespaces``, ``kube_api``, ``kube_token_file``) come from flags and the
environment only, not from the file: they describe the pod, not the routing.

Config file shape (YAML or JSON, every key optional)::

    id: pod-a
    outbound: 127.0.0.1:15001
    admin: 127.0.0.1:15000
    strategy: balanced          # a mesh.profiles name
    policy: equilibrium         # a mesh.policies name
    drain_timeout: 20           # seconds
    max_attempts: 3             # 1 try + retries (default: the profile's max_retries + 1)
    request_timeout: 15         # longest stall: upload, wait for answer, body (default: profile)
    connect_timeout: 1          # TCP connect to an endpoint (default: profile)
    retry_budget_ratio: 0.2     # retries and hedges: at most this share of requests ...
    retry_budget_min_per_s: 10  #   ... plus this many a second (default: the profile's)
    source_address: 10.0.0.5    # connections to endpoints leave from this IP (default: any)
    hedge: false                # hedged exploration of endpoints that answer no probe
    rescue: false               # true: GETs an ejected endpoint holds go to another one
    upstreams:
      users: [http://10.0.0.1:8080, http://10.0.0.2:8080]
      orders: http://10.0.1.1:8080,http://10.0.1.2:8080
      payments:                 # an upstream outside the mesh: no identity, no game headers
        endpoints: [https://api.example.com]
        mesh: false             #   (default true; sidecar.membership)
      config:
        endpoints: [http://10.0.2.1:8080, http://10.0.2.2:8080]
        long_paths: [/v1/watch] # long polls: their answers' time is not learned of the pods
                                #   (wire.long_paths; docs/routing.md, "Long polls")
      users.default.8080:       # without endpoints: a declaration for a discovered upstream
        long_paths: [/watch]
    inbound: 0.0.0.0:15006      # listener in front of the app; needs app (see
    app: http://127.0.0.1:8080  #   sidecar.policing_config for these and ``policing:``)
    mesh_secret_file: /etc/equilibrium/mesh.key
    listener:                   # the outbound listener's defences (docs/grpc.md, "Defences");
      header_timeout: 10        #   first bytes / HTTP/2 preface / an HTTP/1.1 head, seconds
      idle_timeout: 300         #   connection with no request in flight (0: never)
      max_streams: 256          #   SETTINGS_MAX_CONCURRENT_STREAMS per HTTP/2 connection
      max_connections: 4096     #   open connections on the outbound listener
      local_only: true          #   refuse peers that are not this pod (sidecar.local_callers)

Upstreams given by a higher layer replace the whole set of a lower one (they are not merged),
so a reload of the file changes endpoints only when neither flags nor the environment fix them.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mesh.address import AddressError, HostPort, parse_host_port
from mesh.errors import ConfigError
from mesh.policies import POLICY_NAMES
from mesh.profile_names import PROFILE_NAMES
from mesh.profiles import get_profile
from sidecar.discovery import KubeCredentials, credentials_from_flags
from sidecar.h2_server import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_STREAMS
from sidecar.h2_site import DEFAULT_MAX_CONNECTIONS, DEFAULT_SNIFF_TIMEOUT
from sidecar.policing_config import PolicingSettings, parse_app_url, parse_policing
from wire.keys import check_redis_url
from wire.long_paths import parse_long_path_list, parse_long_paths
from wire.numerals import ascii_decimal, ascii_uint

DEFAULT_OUTBOUND = "127.0.0.1:15001"
DEFAULT_ADMIN = "127.0.0.1:15000"
DEFAULT_STRATEGY = "balanced"
DEFAULT_POLICY = "equilibrium"
DEFAULT_DRAIN_TIMEOUT = 20.0

# setting -> environment variable
ENV_VARS: dict[str, str] = {
    "outbound": "EQUILIBRIUM_OUTBOUND",
    "admin": "EQUILIBRIUM_ADMIN",
    "upstreams": "EQUILIBRIUM_UPSTREAMS",
    "strategy": "EQUILIBRIUM_STRATEGY",
    "policy": "EQUILIBRIUM_POLICY",
    "id": "EQUILIBRIUM_ID",
    "drain_timeout": "EQUILIBRIUM_DRAIN_TIMEOUT",
    "max_attempts": "EQUILIBRIUM_MAX_ATTEMPTS",
    "request_timeout": "EQUILIBRIUM_REQUEST_TIMEOUT",
    "connect_timeout": "EQUILIBRIUM_CONNECT_TIMEOUT",
    "retry_budget_ratio": "EQUILIBRIUM_RETRY_BUDGET_RATIO",
    "retry_budget_min_per_s": "EQUILIBRIUM_RETRY_BUDGET_MIN_PER_S",
    "source_address": "EQUILIBRIUM_SOURCE_ADDRESS",
    "config": "EQUILIBRIUM_CONFIG",
    "inbound": "EQUILIBRIUM_INBOUND",
    "app": "EQUILIBRIUM_APP",
    "inbound_long_paths": "EQUILIBRIUM_INBOUND_LONG_PATHS",
    "mesh_secret_file": "EQUILIBRIUM_MESH_SECRET_FILE",
    "redis": "EQUILIBRIUM_REDIS_URL",
    "signaling_epoch": "EQUILIBRIUM_SIGNALING_EPOCH",
    "header_timeout": "EQUILIBRIUM_HEADER_TIMEOUT",
    "idle_timeout": "EQUILIBRIUM_IDLE_TIMEOUT",
    "max_streams": "EQUILIBRIUM_MAX_STREAMS",
    "max_connections": "EQUILIBRIUM_MAX_CONNECTIONS",
    "transparent": "EQUILIBRIUM_TRANSPARENT",
    "hedge": "EQUILIBRIUM_HEDGE",
    "rescue": "EQUILIBRIUM_RESCUE",
    "discovery": "EQUILIBRIUM_DISCOVERY",
    "discovery_namespaces": "EQUILIBRIUM_DISCOVERY_NAMESPACES",
    "kube_api": "EQUILIBRIUM_KUBE_API",
    "kube_token_file": "EQUILIBRIUM_KUBE_TOKEN_FILE",
}
TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})
"""Words a switch's value may be (its environment variable, or a quoted word in the file):
on, or off; anything else is refused (_parse_switch)."""
FILE_KEYS = frozenset(
    {
        "id", "outbound", "admin", "upstreams", "strategy", "policy", "drain_timeout",
        "max_attempts", "request_timeout", "connect_timeout", "source_address", "hedge",
        "rescue",
        "retry_budget_ratio", "retry_budget_min_per_s",
        "inbound", "app", "mesh_secret_file", "policing",  # sidecar.policing_config
        "redis", "signaling_epoch",  # sidecar.signaling
        "listener",  # the outbound listener's defences
    }
)

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


ListenAddress = HostPort
"""A listener's address (:class:`mesh.address.HostPort`; prints IPv6 in brackets)."""


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    """Kubernetes discovery (:mod:`sidecar.discovery`): where the API is and what to watch."""

    credentials: KubeCredentials
    namespaces: tuple[str, ...] | None = None  # None: the whole cluster


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """The outbound listener's defences (:mod:`sidecar.h2_site`, :mod:`sidecar.h2_server`,
    :mod:`sidecar.http1.server`)."""

    header_timeout: float = DEFAULT_SNIFF_TIMEOUT  # first bytes, HTTP/2 preface, HTTP/1.1 head
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # HTTP/2 or HTTP/1.1, nothing in flight; 0: never
    max_streams: int = DEFAULT_MAX_STREAMS  # SETTINGS_MAX_CONCURRENT_STREAMS per connection
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open on the outbound listener
    local_only: bool = True  # only this pod may connect (sidecar.local_callers)


LISTENER_KEYS = ("header_timeout", "idle_timeout", "max_streams", "max_connections",
                 "local_only")


def parse_listener(raw: Mapping[str, Any], what: str = "listener") -> dict[str, Any]:
    """Validate listener limits given by name (the file's ``listener:`` or the environment)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "header_timeout":
            out[key] = _parse_float(value, f"{what}.{key}", 0.01)
        elif key == "idle_timeout":
            out[key] = _parse_float(value, f"{what}.{key}", 0.0)
        elif key == "max_streams":
            out[key] = _parse_int(value, f"{what}.{key}", 1, 1 << 20)
        elif key == "max_connections":
            out[key] = _parse_int(value, f"{what}.{key}", 1, 1 << 24)
        elif key == "local_only":
            if not isinstance(value, bool):
                raise ConfigError(f"{what}.{key}: must be true or false, got {_shown(value)}")
            out[key] = value
        else:
            raise ConfigError(f"{what}: unknown key {key!r} (known: {', '.join(LISTENER_KEYS)})")
    return out


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """Everything the runner needs; immutable, rebuilt whole on reload."""

    id: str
    outbound: ListenAddress
    admin: ListenAddress
    upstreams: Mapping[str, tuple[str, ...]]
    external_upstreams: frozenset[str] = frozenset()  # declared ``mesh: false``
    # upstream -> path prefixes of its declared long requests (wire.long_paths)
    long_paths: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    strategy: str = DEFAULT_STRATEGY
    policy: str = DEFAULT_POLICY
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    max_attempts: int | None = None  # None: the profile's max_retries + 1
    request_timeout: float | None = None  # None: the profile's
    connect_timeout: float | None = None  # None: the profile's
    retry_budget_ratio: float | None = None  # None: the profile's (mesh.retry.RetryBudget)
    retry_budget_min_per_s: float | None = None  # None: the profile's
    source_address: str | None = None  # the IP connections to endpoints leave from (None: any)
    inbound: ListenAddress | None = None  # listener in front of the app (with ``app``)
    app: str | None = None
    mesh_secret_file: Path | None = None  # or env EQUILIBRIUM_MESH_SECRET
    redis: str | None = None  # signaling plane (sidecar.signaling); needs the mesh key
    signaling_epoch: float = 1.0  # seconds between regret summaries
    listener: ListenerLimits = field(default_factory=lambda: ListenerLimits())
    policing: PolicingSettings = field(default_factory=PolicingSettings)
    transparent: bool = False  # route redirected connections by their original destination
    hedge: bool = False  # hedge exploratory picks of bodiless idempotent requests (mesh.hedging)
    rescue: bool = False  # requests held by an endpoint ejected meanwhile go elsewhere
    discovery: DiscoverySettings | None = None  # None: no Kubernetes discovery
    config_file: Path | None = None
    sources: Mapping[str, str] = field(default_factory=dict)  # setting -> layer it came from


# ---------------------------------------------------------------- parsers of single values


def parse_listen(value: str, what: str = "address") -> ListenAddress:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (loopback); see :mod:`mesh.address`."""
    try:
        return parse_host_port(str(value), default_host="127.0.0.1")
    except AddressError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def parse_namespaces(value: str, own: str | None) -> tuple[str, ...] | None:
    """``*`` -> None (cluster-wide); ``a,b`` -> ("a", "b"); empty -> the pod's own namespace
    (cluster-wide when that is unknown)."""
    text = value.strip()
    if text == "*":
        return None
    if not text:
        return (own,) if own else None
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if not _NAMESPACE_RE.match(name):
            raise ConfigError(f"--discovery-namespaces: {name!r} is not a namespace name")
    return names or ((own,) if own else None)


def parse_discovery(
    discovery: bool, api: str, token_file: str, scope: str, env: Mapping[str, str]
) -> DiscoverySettings | None:
    """The discovery settings (None: off) from the Kubernetes flags, checked together."""
    if (api or token_file or scope) and not discovery:
        raise ConfigError("--kube-api/--kube-token-file/--discovery-namespaces need --discovery")
    if not discovery:
        return None
    try:
        credentials = credentials_from_flags(api or None, token_file or None, env)
    except ValueError as exc:
        raise ConfigError(f"discovery: {exc}") from None
    if credentials.token_file is not None and not credentials.token_file.is_file():
        raise ConfigError(f"discovery: token file {str(credentials.token_file)!r} "
                          "does not exist")
    return DiscoverySettings(credentials, parse_namespaces(scope, credentials.namespace))


def parse_endpoint(url: str, upstream: str) -> str:
    """Validate one endpoint URL and return it normalised (``scheme://host:port``)."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"upstream {upstream!r}: bad endpoint URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"upstream {upstream!r}: endpoint {url!r} must be http:// or https://")
    if not parts.hostname:
        raise ConfigError(f"upstream {upstream!r}: endpoint {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(
            f"upstream {upstream!r}: endpoint {url!r} must be scheme://host[:port] only"
        )
    if port == 0:
        raise ConfigError(f"upstream {upstream!r}: endpoint {url!r}: port 0 cannot be "
                          "connected to")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default_port = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}:{port if port is not None else default_port}"


def parse_redis_url(value: Any) -> str:
    """``redis://[user:password@]host:port[/db]``, ``rediss://`` (TLS) or ``unix://``."""
    try:
        return check_redis_url(value)
    except ValueError as exc:
        raise ConfigError(f"redis: {exc}") from None


def parse_upstream_name(name: str) -> str:
    lowered = str(name).strip().lower()
    if not _NAME_RE.match(lowered):
        raise ConfigError(
            f"upstream name {name!r} is not a DNS-style name (letters, digits, '-', '.')"
        )
    return lowered


def parse_endpoints(name: str, value: Any) -> tuple[str, ...]:
    """A comma-separated string or a list of URLs -> de-duplicated, ordered tuple."""
    if isinstance(value, str):
        items: Sequence[Any] = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, list | tuple):
        items = value
    elif value is None:
        items = []
    else:
        raise ConfigError(
            f"upstream {name!r}: endpoints must be a list or a comma-separated string"
        )
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"upstream {name!r}: endpoint {item!r} is not a string")
        ep = parse_endpoint(item, name)
        if ep not in out:
            out.append(ep)
    return tuple(out)


def parse_upstream_flag(spec: str) -> tuple[str, tuple[str, ...]]:
    """``NAME=URL[,URL...]`` as given to ``--upstream``."""
    name, sep, urls = spec.partition("=")
    if not sep:
        raise ConfigError(f"--upstream: expected NAME=URL[,URL...], got {spec!r}")
    clean = parse_upstream_name(name)
    return clean, parse_endpoints(clean, urls)  # NAME= (none yet): warned of, answered 503


def parse_upstreams_env(value: str) -> dict[str, tuple[str, ...]]:
    """``a=url,url;b=url`` as in ``EQUILIBRIUM_UPSTREAMS``."""
    out: dict[str, tuple[str, ...]] = {}
    for part in value.split(";"):
        if part.strip():
            name, endpoints = parse_upstream_flag(part.strip())
            if name in out:
                raise ConfigError(f"upstream {name!r} given twice")
            out[name] = endpoints
    return out


def parse_upstreams_mapping(value: Any) -> dict[str, tuple[str, ...]]:
    """NAME -> URLs, or NAME -> ``{endpoints: URLs, mesh: true|false}``."""
    if not isinstance(value, Mapping):
        raise ConfigError("upstreams: expected a mapping NAME -> list of URLs")
    out: dict[str, tuple[str, ...]] = {}
    for raw_name, endpoints in value.items():
        name = parse_upstream_name(str(raw_name))
        if name in out:
            raise ConfigError(f"upstream {name!r} given twice")
        if isinstance(endpoints, Mapping):
            unknown = set(map(str, endpoints)) - {"endpoints", "mesh", "long_paths"}
            if unknown:
                raise ConfigError(f"upstream {name!r}: unknown key(s) {sorted(unknown)}; "
                                  "known: endpoints, mesh, long_paths")
            if "endpoints" not in endpoints and "long_paths" in endpoints:
                continue  # a declaration for an upstream discovery finds: no group of its own
            endpoints = endpoints.get("endpoints")
        out[name] = parse_endpoints(name, endpoints)
    return out


def parse_external_upstreams(value: Any) -> frozenset[str]:
    """The names of a file's upstreams declared outside the mesh (``mesh: false``)."""
    out: set[str] = set()
    for raw_name, spec in value.items():
        if isinstance(spec, Mapping) and "mesh" in spec:
            mesh = spec["mesh"]
            if not isinstance(mesh, bool):
                raise ConfigError(f"upstream {raw_name!r}: mesh must be true or false, "
                                  f"got {_shown(mesh)}")
            if not mesh:
                out.add(parse_upstream_name(str(raw_name)))
    return frozenset(out)


def parse_upstream_long_paths(value: Any) -> dict[str, tuple[str, ...]]:
    """The path prefixes of declared long requests (long polls, watches) of a file's
    upstreams (``long_paths``; :mod:`wire.long_paths`), by upstream name."""
    out: dict[str, tuple[str, ...]] = {}
    for raw_name, spec in value.items():
        if isinstance(spec, Mapping) and "long_paths" in spec:
            name = parse_upstream_name(str(raw_name))
            try:
                paths = parse_long_paths(spec["long_paths"], f"upstream {name!r}: long_paths")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if paths:
                out[name] = paths
    return out


def _shown(value: Any) -> str:
    """A short repr for a message (an int of 5,000 digits cannot even be turned into text)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)[:32]


def _parse_source_address(value: Any) -> str:
    """An IP address literal (IPv4 or IPv6, no brackets) the sidecar's connections to its
    endpoints leave from; a name, a port or a wildcard is refused: the kernel already picks
    an address when none is given."""
    text = value.strip() if isinstance(value, str) else None
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        address = None
    if address is None or address.is_unspecified or address.is_multicast:
        raise ConfigError("source_address: expected one IP address of this pod (e.g. "
                          f"10.0.0.5 or fd00::5), got {_shown(value)}")
    return str(address)


def _parse_float(value: Any, what: str, low: float) -> float:
    try:  # a string must be a plain ASCII decimal; a huge int overflows float()
        number = ascii_decimal(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        number = None
    except OverflowError:
        number = math.inf
    if number is None or isinstance(value, bool):
        raise ConfigError(f"{what}: expected a finite decimal number, got {_shown(value)}")
    if not low <= number < float("inf"):
        raise ConfigError(f"{what}: must be a finite number >= {low}, got {_shown(value)}")
    return number


def _parse_int(value: Any, what: str, low: int, high: int) -> int:
    text = str(value).strip()
    number = ascii_uint(text.removeprefix("-"))  # ASCII digits only: never int('²')
    if isinstance(value, bool) or number is None:
        raise ConfigError(f"{what}: expected an integer, got {value!r}")
    number = -number if text.startswith("-") else number
    if not low <= number <= high:
        raise ConfigError(f"{what}: must be in {low}..{high}, got {number}")
    return number


def _parse_switch(value: Any, what: str) -> bool:
    """A switch: a boolean (its flag, the file's true/false) or a word read as one (its
    environment variable: 1/true/yes/on, 0/false/no/off); anything else is refused, not
    read as off (a stranger's `hedge: ture` turned hedging off without a word)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise ConfigError(f"{what}: must be true or false, got {_shown(value)}")


def _parse_choice(value: Any, what: str, names: Sequence[str]) -> str:
    text = str(value).strip()
    if text not in names:
        raise ConfigError(f"{what}: unknown {text!r}; choose one of {', '.join(names)}")
    return text


# ---------------------------------------------------------------- layers


def read_file(path: Path, *, empty_ok: bool = True) -> dict[str, Any]:
    """Read a YAML or JSON config file (JSON is YAML; ``.json`` files are parsed strictly).
    ``empty_ok`` False: a file with no document (empty, blanks or comments only) is an
    error, as on a reload, where it is far likelier a file caught mid-write (an editor, a
    ConfigMap sync) than a wish to drop every upstream."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: not UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(path)!r}: not valid YAML/JSON: {exc}") from None
    except ValueError:  # an integer past int()'s 4,300 digits (yaml and json convert it)
        raise ConfigError(f"config file {str(path)!r}: a number is too long") from None
    except RecursionError:
        raise ConfigError(f"config file {str(path)!r}: nested too deeply") from None
    if data is None:
        if not empty_ok:
            raise ConfigError(f"config file {str(path)!r} is empty (caught while being "
                              "written?); an intended empty config says so: upstreams: {}")
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm not in FILE_KEYS:
            known = ", ".join(sorted(FILE_KEYS))
            raise ConfigError(f"config file {str(path)!r}: unknown key {key!r}; known: {known}")
        out[norm] = value
    return out


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings present in the environment (empty values count as absent)."""
    return {k: env[v] for k, v in ENV_VARS.items() if k != "config" and env.get(v, "").strip()}


def _validate_layer(raw: Mapping[str, Any], layer: str) -> dict[str, Any]:
    """Parse one layer's raw values; errors name the layer."""
    out: dict[str, Any] = {}
    try:
        for key, value in raw.items():
            if value is None:
                continue
            if key in ("outbound", "admin", "inbound"):
                out[key] = parse_listen(value, key)
            elif key in ("app", "policing"):
                try:
                    out[key] = parse_app_url(value) if key == "app" else parse_policing(value)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
            elif key == "inbound_long_paths":  # policing.long_paths, for an injected sidecar
                try:
                    out[key] = parse_long_path_list(str(value), "inbound_long_paths")
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
            elif key == "redis":
                out[key] = parse_redis_url(value)
            elif key == "signaling_epoch":
                out[key] = _parse_float(value, "signaling_epoch", 0.05)
            elif key == "listener":
                if not isinstance(value, Mapping):
                    raise ConfigError(f"listener: must be a mapping, got {value!r}")
                out[key] = parse_listener(value)
            elif key in LISTENER_KEYS:  # from the environment, one by one
                out.setdefault("listener", {}).update(parse_listener({key: value}))
            elif key == "mesh_secret_file":
                out[key] = Path(str(value).strip())
            elif key == "upstreams":
                if isinstance(value, str):
                    out[key] = parse_upstreams_env(value)
                elif isinstance(value, list | tuple):  # repeated --upstream flags
                    flags: dict[str, tuple[str, ...]] = {}
                    for spec in value:
                        if not isinstance(spec, str):
                            raise ConfigError(
                                f"upstreams: each entry is NAME=URL[,URL...], got {_shown(spec)}")
                        name, endpoints = parse_upstream_flag(spec)
                        if name in flags:
                            raise ConfigError(f"upstream {name!r} given twice")
                        flags[name] = endpoints
                    out[key] = flags
                else:
                    out[key] = parse_upstreams_mapping(value)
                    out["external_upstreams"] = parse_external_upstreams(value)
                    out["long_paths"] = parse_upstream_long_paths(value)
            elif key == "strategy":
                name = _parse_choice(value, "strategy", PROFILE_NAMES)
                get_profile(name)
                out[key] = name
            elif key == "policy":
                out[key] = _parse_choice(value, "policy", POLICY_NAMES)
            elif key == "id":
                text = str(value).strip()
                if not text or any(c.isspace() or ord(c) < 32 for c in text):
                    raise ConfigError(f"id: must be non-empty without spaces, got {value!r}")
                out[key] = text
            elif key == "drain_timeout":
                out[key] = _parse_float(value, "drain_timeout", 0.0)
            elif key == "max_attempts":
                out[key] = _parse_int(value, "max_attempts", 1, 10)
            elif key in ("request_timeout", "connect_timeout"):
                out[key] = _parse_float(value, key, 0.001)
            elif key in ("retry_budget_ratio", "retry_budget_min_per_s"):
                out[key] = _parse_float(value, key, 0.0)
                if key == "retry_budget_ratio" and out[key] > 10.0:
                    raise ConfigError(f"{key}: at most 10 retries per request, got {value!r}")
            elif key == "source_address":
                out[key] = _parse_source_address(value)
            elif key in ("transparent", "discovery", "hedge", "rescue"):
                out[key] = _parse_switch(value, key)
            elif key in ("discovery_namespaces", "kube_api", "kube_token_file"):
                out[key] = str(value).strip()
    except ConfigError as exc:
        raise ConfigError(f"{layer}: {exc}") from None
    return out


_ANY_HOST = ("0.0.0.0", "::", "")


def _check_listeners_apart(listeners: Mapping[str, ListenAddress]) -> None:
    """Two listeners of one sidecar on one port (the same host, or either on every
    address) could never both bind: said as a setting that cannot work, before any binds."""
    seen: list[tuple[str, ListenAddress]] = []
    for name, address in listeners.items():
        for other, taken in seen:
            if address.port and address.port == taken.port and (
                    address.host == taken.host or address.host in _ANY_HOST
                    or taken.host in _ANY_HOST):
                raise ConfigError(f"{name} {address} and {other} {taken} are on one port: "
                                  "each listener needs its own")
        seen.append((name, address))


def _policing(merged: Mapping[str, Any]) -> PolicingSettings:
    """The ``policing:`` settings, with ``--inbound-long-paths`` (or its environment variable)
    in place of the file's ``long_paths`` when given: the one policing setting a sidecar
    without a config file (an injected one) is given, from its pod's annotation."""
    policing: PolicingSettings = merged.get("policing", PolicingSettings())
    if "inbound_long_paths" in merged:
        policing = replace(policing, long_paths=merged["inbound_long_paths"])
    return policing


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """The inputs of a config (flags, environment, file path); ``load()`` re-reads the file.

    ``flags`` holds only the settings given on the command line (absent = not given).
    """

    flags: Mapping[str, Any]
    env: Mapping[str, str]
    config_file: Path | None = None

    @classmethod
    def from_sources(
        cls, flags: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> ConfigSource:
        environ = dict(os.environ if env is None else env)
        path = flags.get("config") or environ.get(ENV_VARS["config"], "").strip() or None
        given = {k: v for k, v in flags.items() if k != "config" and v not in (None, [], ())}
        return cls(given, environ, Path(path) if path else None)

    def load(self, *, reload: bool = False) -> SidecarConfig:
        """The config from its layers; ``reload``: re-read for a running sidecar (an empty
        file is then refused, :func:`read_file`)."""
        merged: dict[str, Any] = {}
        sources: dict[str, str] = {}
        layers: list[tuple[str, Mapping[str, Any]]] = []
        if self.config_file is not None:
            layers.append((f"config file {str(self.config_file)!r}",
                           read_file(self.config_file, empty_ok=not reload)))
        layers.append(("environment", read_env(self.env)))
        layers.append(("command line", self.flags))
        for layer, raw in layers:
            for key, value in _validate_layer(raw, layer).items():
                # listener limits merge key by key (the environment sets them one by one)
                merged[key] = {**merged.get(key, {}), **value} if key == "listener" else value
                sources[key] = layer
                if key == "upstreams":  # a layer's upstreams come with their declarations
                    merged["external_upstreams"] = frozenset()
                    merged["long_paths"] = {}
        if (merged.get("inbound") is None) != (merged.get("app") is None):
            raise ConfigError("inbound and app go together: --inbound HOST:PORT --app URL")
        if merged.get("inbound_long_paths") and merged.get("inbound") is None:
            raise ConfigError("inbound_long_paths declares the app's long requests: it needs "
                              "--inbound HOST:PORT --app URL")
        _check_listeners_apart({
            "outbound": merged.get("outbound") or parse_listen(DEFAULT_OUTBOUND),
            "admin": merged.get("admin") or parse_listen(DEFAULT_ADMIN),
            **({"inbound": merged["inbound"]} if merged.get("inbound") else {})})
        discovery = parse_discovery(
            merged.get("discovery", False), merged.get("kube_api", ""),
            merged.get("kube_token_file", ""), merged.get("discovery_namespaces", ""), self.env,
        )
        return SidecarConfig(
            id=merged.get("id") or f"{socket.gethostname()}-{os.getpid()}",
            outbound=merged.get("outbound") or parse_listen(DEFAULT_OUTBOUND),
            admin=merged.get("admin") or parse_listen(DEFAULT_ADMIN),
            upstreams=merged.get("upstreams", {}),
            external_upstreams=merged.get("external_upstreams", frozenset()),
            long_paths=merged.get("long_paths", {}),
            strategy=merged.get("strategy", DEFAULT_STRATEGY),
            policy=merged.get("policy", DEFAULT_POLICY),
            drain_timeout=merged.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT),
            max_attempts=merged.get("max_attempts"),
            request_timeout=merged.get("request_timeout"),
            connect_timeout=merged.get("connect_timeout"),
            retry_budget_ratio=merged.get("retry_budget_ratio"),
            retry_budget_min_per_s=merged.get("retry_budget_min_per_s"),
            source_address=merged.get("source_address"),
            inbound=merged.get("inbound"),
            app=merged.get("app"),
            mesh_secret_file=merged.get("mesh_secret_file"),
            redis=merged.get("redis"),
            signaling_epoch=merged.get("signaling_epoch", 1.0),
            listener=ListenerLimits(**merged.get("listener", {})),
            policing=_policing(merged),
            transparent=merged.get("transparent", False),
            hedge=merged.get("hedge", False),
            rescue=merged.get("rescue", False),
            discovery=discovery,
            config_file=self.config_file,
            sources=sources,
        )
