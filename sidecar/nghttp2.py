"""libnghttp2, the HTTP/2 engine of curl, Apache httpd and Node.js, driven through :mod:`ctypes`
with the interface of the :mod:`h2` library's connection, so that the sidecar's HTTP/2 code runs
on either.

Why: the pure-Python ``h2`` state machine costs a proxied gRPC call 231–282 µs of CPU, two to
three times HAProxy's whole call; libnghttp2 does the same protocol work, its callbacks into
Python included, in 43–50 µs (``scripts/h2_engine_cost.py``, docs/benchmarks.md). The library is
on these machines as a dependency of libcurl (``libnghttp2.so.14``); where it is missing,
:func:`available` is False and the sidecar stays on ``h2``.

:class:`NgConnection` offers the part of ``h2.connection.H2Connection`` the sidecar uses
(:mod:`sidecar.h2_connection`, ``h2_server``, ``h2_client``) and returns the same
``h2.events`` objects from :meth:`NgConnection.receive_data`, so nothing above it tells the two
apart. Where the engines differ, this module follows the library and says so:

- nghttp2 pulls what it sends (a data provider per stream); ``send_data`` queues the bytes and
  the provider hands them over as the peer's windows allow, so ``local_flow_control_window``
  is the peer's window less what is queued here. Trailers after a body go out from the
  provider, after its last byte (nghttp2 would otherwise send the HEADERS first).
- Received DATA is given back as credit only when the sidecar says it passed it on
  (``acknowledge_received_data``), as with ``h2``: automatic WINDOW_UPDATE is off.
- A malformed request or response is a *stream* error (RST_STREAM PROTOCOL_ERROR, RFC 9113
  §8.1.1), where ``h2`` ends the connection; it reaches the sidecar as a ``StreamReset`` with
  ``remote_reset`` False.
- A header field over 64 KiB (name and value) ends the connection with COMPRESSION_ERROR:
  nghttp2's decoder has that fixed limit. Header *lists* over the announced
  SETTINGS_MAX_HEADER_LIST_SIZE made of smaller fields are the sidecar's to refuse per stream.
- A server's SETTINGS_MAX_CONCURRENT_STREAMS is announced in a SETTINGS frame of this
  module's own, which the library never learns of (it would end the connection of a peer
  that opens more; the sidecar refuses those streams alone, ``over_limit``, as with ``h2``).

Every frame received can first be counted by ``frame_budget`` (the listener's flood budgets,
:mod:`sidecar.h2_guard`); a frame over budget stops the read (``flooded``), as with ``h2``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h2.settings

Headers = list[tuple[bytes, bytes]]

SONAME = "libnghttp2.so.14"
MIN_VERSION = 0x013400  # 1.52, Debian 12's

# frame types and flags (RFC 9113 §6)
(DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE,
 CONTINUATION) = range(10)
FLAG_END_STREAM = 0x01
FLAG_ACK = 0x01
# nghttp2's header categories, data flags and errors (nghttp2.h)
HCAT_REQUEST, HCAT_RESPONSE, HCAT_PUSH_RESPONSE, HCAT_HEADERS = range(4)
DATA_FLAG_EOF = 0x01
DATA_FLAG_NO_END_STREAM = 0x02
ERR_DEFERRED = -508
ERR_CANCEL = -535
ERR_CALLBACK_FAILURE = -902
ERR_BAD_CLIENT_MAGIC = -903
ERR_FLOODED = -904
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
SETTINGS_INITIAL_WINDOW = 0x4
MAX_SEND_HEADER_BLOCK = 1024 * 1024  # as h2's decoding limit (h2_connection.HEADER_LIST_HARD_LIMIT)

_vp, _sz, _i32, _u32, _u8 = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32, ctypes.c_uint32,
                             ctypes.c_uint8)


class _FrameHd(ctypes.Structure):
    _fields_ = [("length", _sz), ("stream_id", _i32), ("type", _u8), ("flags", _u8),
                ("reserved", _u8)]


class _PrioritySpec(ctypes.Structure):
    _fields_ = [("stream_id", _i32), ("weight", _i32), ("exclusive", _u8)]


class _HeadersFrame(ctypes.Structure):
    _fields_ = [("hd", _FrameHd), ("padlen", _sz), ("pri_spec", _PrioritySpec),
                ("nva", _vp), ("nvlen", _sz), ("cat", ctypes.c_int)]


class _RstStreamFrame(ctypes.Structure):
    _fields_ = [("hd", _FrameHd), ("error_code", _u32)]


class _SettingsEntry(ctypes.Structure):
    _fields_ = [("settings_id", _i32), ("value", _u32)]


class _SettingsFrame(ctypes.Structure):
    _fields_ = [("hd", _FrameHd), ("niv", _sz), ("iv", ctypes.POINTER(_SettingsEntry))]


class _PingFrame(ctypes.Structure):
    _fields_ = [("hd", _FrameHd), ("opaque_data", _u8 * 8)]


class _GoawayFrame(ctypes.Structure):
    _fields_ = [("hd", _FrameHd), ("last_stream_id", _i32), ("error_code", _u32),
                ("opaque_data", _vp), ("opaque_data_len", _sz), ("reserved", _u8)]


class _WindowUpdateFrame(ctypes.Structure):
    _fields_ = [("hd", _FrameHd), ("window_size_increment", _i32), ("reserved", _u8)]


class _Nv(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p), ("namelen", _sz),
                ("valuelen", _sz), ("flags", _u8)]


_READ = ctypes.CFUNCTYPE(ctypes.c_ssize_t, _vp, _i32, _vp, _sz, ctypes.POINTER(_u32), _vp, _vp)


class _DataProvider(ctypes.Structure):
    _fields_ = [("source", _vp), ("read_callback", _READ)]


_ON_BEGIN_FRAME = ctypes.CFUNCTYPE(ctypes.c_int, _vp, ctypes.POINTER(_FrameHd), _vp)
_ON_FRAME = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _vp, _vp)  # begin_headers, frame_recv
_ON_HEADER = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _vp, _vp, _sz, _vp, _sz, _u8, _vp)
_ON_DATA = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _u8, _i32, _vp, _sz, _vp)
_ON_CLOSE = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _i32, _u32, _vp)
_ON_ERROR = ctypes.CFUNCTYPE(ctypes.c_int, _vp, ctypes.c_int, _vp, _sz, _vp)
_UNPACK_EXTENSION = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _vp, _vp, _vp)
_ON_EXTENSION_CHUNK = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _vp, _vp, _sz, _vp)


def _load() -> Any:
    """The library with the prototypes used here, or None (missing, or older than 1.52)."""
    names = [SONAME]
    found = ctypes.util.find_library("nghttp2")
    if found and found != SONAME:
        names.insert(0, found)
    lib: Any = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return None

    class _Info(ctypes.Structure):
        _fields_ = [("age", ctypes.c_int), ("version_num", ctypes.c_int),
                    ("version_str", ctypes.c_char_p), ("proto_str", ctypes.c_char_p)]

    lib.nghttp2_version.restype = ctypes.POINTER(_Info)
    lib.nghttp2_version.argtypes = [ctypes.c_int]
    info = lib.nghttp2_version(0).contents
    if info.version_num < MIN_VERSION:
        return None
    lib.version = info.version_str.decode()
    pp = ctypes.POINTER(_vp)
    prototypes: dict[str, tuple[Any, list[Any]]] = {
        "nghttp2_session_callbacks_new": (ctypes.c_int, [pp]),
        "nghttp2_session_callbacks_del": (None, [_vp]),
        "nghttp2_option_new": (ctypes.c_int, [pp]),
        "nghttp2_option_del": (None, [_vp]),
        "nghttp2_option_set_no_auto_window_update": (None, [_vp, ctypes.c_int]),
        "nghttp2_option_set_peer_max_concurrent_streams": (None, [_vp, _u32]),
        "nghttp2_option_set_no_closed_streams": (None, [_vp, ctypes.c_int]),
        "nghttp2_option_set_user_recv_extension_type": (None, [_vp, _u8]),
        "nghttp2_option_set_max_send_header_block_length": (None, [_vp, _sz]),
        "nghttp2_session_client_new2": (ctypes.c_int, [pp, _vp, _vp, _vp]),
        "nghttp2_session_server_new2": (ctypes.c_int, [pp, _vp, _vp, _vp]),
        "nghttp2_session_del": (None, [_vp]),
        "nghttp2_session_mem_recv": (ctypes.c_ssize_t, [_vp, ctypes.c_char_p, _sz]),
        "nghttp2_session_mem_send": (ctypes.c_ssize_t, [_vp, pp]),
        "nghttp2_session_want_read": (ctypes.c_int, [_vp]),
        "nghttp2_submit_settings": (ctypes.c_int, [_vp, _u8, _vp, _sz]),
        "nghttp2_submit_request": (_i32, [_vp, _vp, _vp, _sz, _vp, _vp]),
        "nghttp2_submit_response": (ctypes.c_int, [_vp, _i32, _vp, _sz, _vp]),
        "nghttp2_submit_headers": (_i32, [_vp, _u8, _i32, _vp, _vp, _sz, _vp]),
        "nghttp2_submit_trailer": (ctypes.c_int, [_vp, _i32, _vp, _sz]),
        "nghttp2_submit_data": (ctypes.c_int, [_vp, _u8, _i32, _vp]),
        "nghttp2_submit_rst_stream": (ctypes.c_int, [_vp, _u8, _i32, _u32]),
        "nghttp2_submit_goaway": (ctypes.c_int, [_vp, _u8, _i32, _u32, _vp, _sz]),
        "nghttp2_session_resume_data": (ctypes.c_int, [_vp, _i32]),
        "nghttp2_session_consume": (ctypes.c_int, [_vp, _i32, _sz]),
        "nghttp2_session_consume_connection": (ctypes.c_int, [_vp, _sz]),
        "nghttp2_session_set_local_window_size": (ctypes.c_int, [_vp, _u8, _i32, _i32]),
        "nghttp2_session_get_local_window_size": (_i32, [_vp]),
        "nghttp2_session_get_stream_remote_window_size": (_i32, [_vp, _i32]),
        "nghttp2_session_get_remote_window_size": (_i32, [_vp]),
        "nghttp2_session_get_remote_settings": (_u32, [_vp, ctypes.c_int]),
        "nghttp2_session_get_next_stream_id": (_u32, [_vp]),
        "nghttp2_session_get_last_proc_stream_id": (_i32, [_vp]),
        "nghttp2_session_find_stream": (_vp, [_vp, _i32]),
        "nghttp2_strerror": (ctypes.c_char_p, [ctypes.c_int]),
    }
    setters = {"on_begin_frame": _ON_BEGIN_FRAME, "on_begin_headers": _ON_FRAME,
               "on_header": _ON_HEADER, "on_frame_recv": _ON_FRAME,
               "on_data_chunk_recv": _ON_DATA, "on_stream_close": _ON_CLOSE}
    try:
        for name, (restype, argtypes) in prototypes.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        for name, kind in setters.items():
            getattr(lib, f"nghttp2_session_callbacks_set_{name}_callback").argtypes = [_vp, kind]
        lib.nghttp2_session_callbacks_set_error_callback2.argtypes = [_vp, _ON_ERROR]
        lib.nghttp2_session_callbacks_set_unpack_extension_callback.argtypes = [
            _vp, _UNPACK_EXTENSION]
        lib.nghttp2_session_callbacks_set_on_extension_chunk_recv_callback.argtypes = [
            _vp, _ON_EXTENSION_CHUNK]
    except AttributeError:  # a build without one of them
        return None
    return lib


_LIB: Any = None
_LOADED = False
_OPTION: int | None = None  # one set of options, copied by every session made with it


def _option(lib: Any) -> int:
    """The sessions' options: credit given back only as the sidecar says, the peer's limit
    on streams 100 until its SETTINGS say otherwise, no closed streams kept (no priority
    tree here), and every frame type after CONTINUATION taken as an extension that is
    ignored, so that ``on_begin_frame`` (the flood budget) sees it: the library skips
    undefined types, ALTSVC and ORIGIN without a callback otherwise."""
    global _OPTION
    if _OPTION is None:
        option = _vp()
        lib.nghttp2_option_new(ctypes.byref(option))
        lib.nghttp2_option_set_no_auto_window_update(option, 1)
        lib.nghttp2_option_set_peer_max_concurrent_streams(option, 100)
        lib.nghttp2_option_set_no_closed_streams(option, 1)
        # a header block the sidecar accepted (up to its list limit) plus the fields it adds
        # goes out in CONTINUATION frames, as with h2: the library's default refuses to
        # send more than 64 KiB and drops the stream's frames
        lib.nghttp2_option_set_max_send_header_block_length(option, MAX_SEND_HEADER_BLOCK)
        for kind in range(CONTINUATION + 1, 256):
            lib.nghttp2_option_set_user_recv_extension_type(option, kind)
        _OPTION = int(option.value or 0)
    return _OPTION


def library() -> Any:
    """The loaded library (once per process), or None where it cannot be used."""
    global _LIB, _LOADED
    if not _LOADED:
        _LIB, _LOADED = _load(), True
    return _LIB


def available() -> bool:
    return library() is not None


def version() -> str | None:
    lib = library()
    return lib.version if lib is not None else None


# ---------------------------------------------------------------- callbacks (one set a process)

# A session's user data -> its connection, weakly (a plain dict of references, removed by
# the session's finalizer: a WeakValueDictionary's Python-level get was a twentieth of the
# instructions of a proxied gRPC call, a callback per header of every block)
_machines: dict[int, weakref.ref[NgConnection]] = {}
_keys = itertools.count(1)
HEADER_BLOCK_LIMIT = 1024 * 1024
"""The decoded size of one received header block (RFC 9113 §6.5.2's count: each field's name
and value plus 32) past which the connection ends, as ``h2``'s decoder ends it: HPACK lets a
peer send a field repeated for a byte or two each, so the limit is on what is decoded, as it
is decoded (``sidecar.h2_connection.HEADER_LIST_HARD_LIMIT``; a block over the 64 KiB
announced is refused alone, after it was read)."""
# ctypes.string_at without its Python wrapper (one call per header name and value)
_string_at: Callable[[int, int], bytes] = getattr(ctypes, "_string_at", ctypes.string_at)


def _guarded(name: str, method: Callable[..., int]) -> Callable[..., int]:
    """A callback that finds its connection by the session's user data and never lets an
    exception through the C library (ctypes would print and go on): the first one is kept and
    raised when the library returns. The frequent shape (session, frame, user data: a frame
    begun, a header block begun, a frame received) without the general one's argument
    tuples."""

    def on_frame(_session: int, frame: int, key: int) -> int:
        ref = _machines.get(key)
        machine = ref() if ref is not None else None
        if machine is None:
            return ERR_CALLBACK_FAILURE
        try:
            return method(machine, frame)
        except BaseException as exc:  # raised again by the caller of the library
            return _failed(machine, exc)

    def callback(*args: Any) -> int:
        ref = _machines.get(args[-1])
        machine = ref() if ref is not None else None
        if machine is None:
            return ERR_CALLBACK_FAILURE
        try:
            return method(machine, *args[1:-1])
        except BaseException as exc:  # raised again by the caller of the library
            return _failed(machine, exc)

    chosen = on_frame if method.__code__.co_argcount == 2 else callback
    chosen.__name__ = name
    return chosen


def _failed(machine: NgConnection, exc: BaseException) -> int:
    """A callback's error: the first one is kept, to be raised when the library returns."""
    if machine._error is None:
        machine._error = exc
    return ERR_CALLBACK_FAILURE


def _release(lib: Any, session: int | None, key: int) -> None:
    """A connection's end (its finalizer): the library's session freed, its key forgotten."""
    _machines.pop(key, None)
    lib.nghttp2_session_del(session)


class _Outgoing:
    """What the sidecar gave a stream to send that the library has not taken yet."""

    __slots__ = ("chunks", "deferred", "ended", "size", "trailers")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.ended = False
        self.trailers: Headers | None = None
        self.deferred = False


class _RemoteSettings:
    """``h2``'s ``remote_settings``, read from the library."""

    __slots__ = ("_machine",)

    def __init__(self, machine: NgConnection) -> None:
        self._machine = machine

    @property
    def max_concurrent_streams(self) -> int:
        m = self._machine
        return int(m._lib.nghttp2_session_get_remote_settings(
            m._session, SETTINGS_MAX_CONCURRENT_STREAMS))

    @property
    def max_frame_size(self) -> int:
        m = self._machine
        return int(m._lib.nghttp2_session_get_remote_settings(m._session,
                                                               SETTINGS_MAX_FRAME_SIZE))


def _goaway_code(data: bytes) -> int | None:
    """The error code of the last GOAWAY among the frames of ``data``, if any."""
    i, code = 0, None
    while i + 9 <= len(data):
        length = int.from_bytes(data[i:i + 3], "big")
        if data[i + 3] == GOAWAY and length >= 8:
            code = int.from_bytes(data[i + 13:i + 17], "big")
        i += 9 + length
    return code


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags))
            + stream_id.to_bytes(4, "big") + payload)


def _nva(fields: Iterable[tuple[bytes, bytes]]) -> tuple[Any, int]:
    pairs = [(name, value, len(name), len(value), 0) for name, value in fields]
    array: Any = _Nv * len(pairs)  # (built from tuples: cheaper than a _Nv each)
    return array(*pairs), len(pairs)


class NgConnection:
    """One HTTP/2 connection's protocol state on libnghttp2, with ``h2``'s interface; see the
    module docstring. Build it with :func:`connection`."""

    def __init__(self, lib: Any, *, client_side: bool) -> None:
        self._lib = lib
        self.client_side = client_side
        self._key = next(_keys)
        self._error: BaseException | None = None
        self._events: list[h2.events.Event] = []
        self._heads: dict[int, Headers] = {}
        self._block: Headers = []  # the fields of the header block being read
        self._block_size = 0  # their size (HEADER_BLOCK_LIMIT)
        self._chunks: dict[int, list[bytes]] = {}
        self._sending: dict[int, _Outgoing] = {}
        self._queued = 0  # bytes in every _Outgoing
        self._known: set[int] = set()  # streams the sidecar was told of (or opened)
        self._answered: set[int] = set()  # client: streams whose final response head came
        self._open_inbound: set[int] = set()  # server: streams the peer opened, not closed
        self._opened_now: set[int] = set()  # requests received in the read being handled
        # A server's SETTINGS_MAX_CONCURRENT_STREAMS goes out in a SETTINGS frame of its own
        # that the library never learns of: it ends the connection when a peer exceeds the
        # limit it knows (RFC 9113 §5.1.2 asks a stream error), where the sidecar refuses the
        # stream alone (``over_limit``). That frame goes first, so the peer's first SETTINGS
        # ACK is its own and is taken out of what the library reads (``_take_our_ack``).
        self._max_inbound = 0xFFFFFFFF
        self.over_limit: set[int] = set()
        self._our_ack_due = False
        self._scan_magic = 0 if client_side else 24  # the client's preface, before frames
        self._scan_skip = 0  # payload bytes of the frame being passed through
        self._scan_head = b""  # a frame header split between two reads
        self._pending = b""  # sent by the library while a read was handled
        self._started = False  # bytes were handed out to send
        self._received = 0  # DATA bytes handed to the sidecar, and those it acknowledged
        self._acknowledged = 0
        self.goaway_sent = False
        self.goaway_received = False
        # the error code of a GOAWAY the library sent by itself (its own limit on resets:
        # Debian's 1.52 allows 1,000 at once, then 33 a second), once seen
        self.library_goaway: int | None = None
        self._resets_read = False
        self.error_message = ""
        self.remote_settings = _RemoteSettings(self)
        # the listener's hooks (server side): a frame's flood budget, a stream opened within
        # the limit, a stream the library refused past it
        self.frame_budget: Callable[[int], str | None] | None = None  # type -> kind over
        # (stream, opened in this same read) -> the kind over its budget, if any
        self.reset_budget: Callable[[int, bool], str | None] | None = None
        self.flooded: str | None = None  # the kind over its budget (nothing more was read)
        self.stream_opened: Callable[[], None] | None = None

        callbacks, session = _vp(), _vp()
        lib.nghttp2_session_callbacks_new(ctypes.byref(callbacks))
        for name, thunk in _THUNKS.items():
            getattr(lib, f"nghttp2_session_callbacks_set_{name}_callback")(callbacks, thunk)
        lib.nghttp2_session_callbacks_set_error_callback2(callbacks, _ERROR_THUNK)
        lib.nghttp2_session_callbacks_set_unpack_extension_callback(callbacks, _IGNORE_EXTENSION)
        lib.nghttp2_session_callbacks_set_on_extension_chunk_recv_callback(
            callbacks, _EXTENSION_CHUNK)
        new = lib.nghttp2_session_client_new2 if client_side else lib.nghttp2_session_server_new2
        rv = new(ctypes.byref(session), callbacks, _vp(self._key), _option(lib))
        lib.nghttp2_session_callbacks_del(callbacks)
        if rv != 0:
            raise MemoryError(f"nghttp2 session not created: {self._strerror(rv)}")
        self._session = session.value
        _machines[self._key] = weakref.ref(self)
        weakref.finalize(self, _release, lib, self._session, self._key)

    def _strerror(self, code: int) -> str:
        text = self._lib.nghttp2_strerror(code)
        return text.decode() if text else str(code)

    # ------------------------------------------------------------ h2's interface: settings

    def initiate_connection(self) -> None:
        settings = {SETTINGS_MAX_HEADER_LIST_SIZE: 65536}
        if self.client_side:  # (a server announces its stream limit with update_settings)
            settings[SETTINGS_MAX_CONCURRENT_STREAMS] = 100
            settings[SETTINGS_ENABLE_PUSH] = 0
        self.update_settings(settings)

    def update_settings(self, new_settings: Mapping[int, int]) -> None:
        new_settings = dict(new_settings)
        limit = new_settings.pop(SETTINGS_MAX_CONCURRENT_STREAMS, None)
        if limit is not None and not self.client_side:
            if self._our_ack_due or self._started:
                raise NotImplementedError("a server's stream limit is set once, at the start")
            self._max_inbound = int(limit)
            self._pending = _frame(SETTINGS, 0, 0, (SETTINGS_MAX_CONCURRENT_STREAMS).to_bytes(
                2, "big") + int(limit).to_bytes(4, "big")) + self._pending
            self._our_ack_due = True
        elif limit is not None:
            new_settings[SETTINGS_MAX_CONCURRENT_STREAMS] = limit
        if not new_settings:
            return
        array: Any = _SettingsEntry * len(new_settings)
        entries = array(*[(int(code), int(value)) for code, value in new_settings.items()])
        self._check(self._lib.nghttp2_submit_settings(self._session, 0, entries,
                                                      len(new_settings)))

    def increment_flow_control_window(self, increment: int) -> None:
        """Widen the connection's receive window (the only one the sidecar widens; h2's
        method also takes a stream)."""
        lib = self._lib
        size = lib.nghttp2_session_get_local_window_size(self._session) + increment
        self._check(lib.nghttp2_session_set_local_window_size(self._session, 0, 0, size))

    @property
    def max_outbound_frame_size(self) -> int:
        return self.remote_settings.max_frame_size

    @property
    def highest_inbound_stream_id(self) -> int:
        return int(self._lib.nghttp2_session_get_last_proc_stream_id(self._session))

    def get_next_available_stream_id(self) -> int:
        return int(self._lib.nghttp2_session_get_next_stream_id(self._session))

    def _check(self, rv: int) -> int:
        if rv < 0:
            raise h2.exceptions.ProtocolError(self._strerror(rv))
        return rv

    # ------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[h2.events.Event]:
        """The events of ``data``, after those that sending raised since the last read
        (:meth:`take_events`: a stream the library closed while sending)."""
        lib = self._lib
        self._opened_now.clear()
        if self._our_ack_due:
            data = self._take_our_ack(data)
        rv = lib.nghttp2_session_mem_recv(self._session, data, len(data))
        error, self._error = self._error, None
        if error is not None:
            raise error
        if rv < 0:
            if self.flooded:
                return self.take_events()  # the owner ends the connection
            if rv == ERR_BAD_CLIENT_MAGIC:
                raise h2.exceptions.ProtocolError("invalid HTTP/2 preface")
            raise h2.exceptions.ProtocolError(self.error_message or self._strerror(rv))
        # What the library sends in answer (SETTINGS and PING acknowledgements, a GOAWAY
        # after a connection error) is taken now: the library says nothing else of a
        # connection error than the GOAWAY it queues for it.
        sent = self._mem_send()
        self._pending += sent
        resets, self._resets_read = self._resets_read, False
        code = _goaway_code(sent) if sent else None
        if code:  # a GOAWAY with an error, from the library (ours are flushed when made)
            wants = lib.nghttp2_session_want_read(self._session)
            if resets and code == h2.errors.ErrorCodes.INTERNAL_ERROR \
                    and (wants or not self._known):
                # its own limit on resets: graceful, the calls in flight go on
                self.goaway_sent = True
                self.library_goaway = code
            else:  # a connection error: the session is over, whatever GOAWAY came before
                raise h2.exceptions.ProtocolError(self._ended_why(code))
        elif not (self.goaway_sent or self.goaway_received) \
                and not lib.nghttp2_session_want_read(self._session):
            raise h2.exceptions.ProtocolError(self._ended_why(None))
        return self.take_events()

    def take_events(self) -> list[h2.events.Event]:
        """The events raised since they were last taken. Reading returns them; the owner
        also takes them after sending, where the library may close a stream (a header block
        it cannot send, a provider that failed), so that the stream's reader hears of it."""
        events, self._events = self._events, []
        return events

    def _take_our_ack(self, data: bytes) -> bytes:
        """``data`` without the peer's first SETTINGS ACK (the one for our own frame): the
        frames are walked, and passed on whole or in part, until it is found."""
        out = []
        i, n = 0, len(data)
        if self._scan_magic:
            take = min(self._scan_magic, n)
            out.append(data[:take])
            self._scan_magic -= take
            i = take
        while i < n:
            if self._scan_skip:
                take = min(self._scan_skip, n - i)
                out.append(data[i:i + take])
                self._scan_skip -= take
                i += take
                continue
            wanted = 9 - len(self._scan_head)
            head = self._scan_head + data[i:i + wanted]
            i += min(wanted, n - i)
            if len(head) < 9:
                self._scan_head = head  # passed on once whole
                break
            self._scan_head = b""
            length = int.from_bytes(head[:3], "big")
            if head[3] == SETTINGS and head[4] & FLAG_ACK and length == 0:
                self._our_ack_due = False
                out.append(data[i:])
                break
            out.append(head)
            self._scan_skip = length
        return b"".join(out)

    def _ended_why(self, code: int | None) -> str:
        """Why the library ended the connection, from the GOAWAY it queued (``code``)."""
        if code is None:
            return self.error_message or "the HTTP/2 engine ended the connection"
        try:
            name = h2.errors.ErrorCodes(code).name
        except ValueError:
            name = str(code)
        detail = f": {self.error_message}" if self.error_message else ""
        return f"the HTTP/2 engine ended the connection (GOAWAY {name}){detail}"

    def _on_begin_frame(self, hd: Any) -> int:
        head = hd.contents
        budget = self.frame_budget
        if budget is not None and (over := budget(head.type)) is not None:
            self.flooded = over
            return ERR_CALLBACK_FAILURE  # nothing after it is processed
        return 0

    def _on_begin_headers(self, frame: int) -> int:
        head = _HeadersFrame.from_address(frame)
        sid = head.hd.stream_id
        # A header block comes whole, its frames together (RFC 9113 §4.3): its fields, one
        # callback each, go to the list of the block begun last.
        self._heads[sid] = self._block = []
        self._block_size = 0
        if head.cat == HCAT_REQUEST and not self.client_side:
            if len(self._open_inbound) >= self._max_inbound:
                self.over_limit.add(sid)  # the owner refuses it (REFUSED_STREAM)
            self._open_inbound.add(sid)
        return 0

    def _on_data_chunk(self, _flags: int, sid: int, data: int, length: int) -> int:
        self._received += length
        chunks = self._chunks.get(sid)
        if chunks is None:
            self._chunks[sid] = [_string_at(data, length)]
        else:
            chunks.append(_string_at(data, length))
        return 0

    def _on_frame_recv(self, frame: int) -> int:
        hd = _FrameHd.from_address(frame)
        kind, sid, flags = hd.type, hd.stream_id, hd.flags
        events = self._events
        if kind == DATA:
            chunks = self._chunks.pop(sid, None)
            data = (chunks[0] if len(chunks) == 1 else b"".join(chunks)) if chunks else b""
            got = h2.events.DataReceived(stream_id=sid, data=data,
                                         flow_controlled_length=len(data))
            events.append(got)
            if flags & FLAG_END_STREAM:
                got.stream_ended = self._ended(sid)
        elif kind == HEADERS:
            self._headers_received(_HeadersFrame.from_address(frame), sid, flags)
        elif kind == RST_STREAM:
            # counted here, before the library's own limit on resets (Debian's 1.52 ends a
            # connection past 1,000 at once), so the listener's budget decides first
            budget = self.reset_budget
            if budget is not None and (over := budget(sid, sid in self._opened_now)) is not None:
                self.flooded = over
                return ERR_CALLBACK_FAILURE
            self._resets_read = True
            self._known.discard(sid)
            self._drop(sid)
            events.append(h2.events.StreamReset(
                stream_id=sid, error_code=_RstStreamFrame.from_address(frame).error_code,
                remote_reset=True))
        elif kind == WINDOW_UPDATE:
            events.append(h2.events.WindowUpdated(
                stream_id=sid,
                delta=_WindowUpdateFrame.from_address(frame).window_size_increment))
        elif kind == SETTINGS:
            self._settings_received(frame, flags)
        elif kind == PING:
            kind_of = h2.events.PingAckReceived if flags & FLAG_ACK else h2.events.PingReceived
            events.append(kind_of(ping_data=bytes(_PingFrame.from_address(frame).opaque_data)))
        elif kind == GOAWAY:
            goaway = _GoawayFrame.from_address(frame)
            ended = h2.events.ConnectionTerminated()
            ended.error_code = goaway.error_code
            ended.last_stream_id = goaway.last_stream_id
            ended.additional_data = (ctypes.string_at(goaway.opaque_data, goaway.opaque_data_len)
                                     if goaway.opaque_data_len else None)
            self.goaway_received = True
            events.append(ended)
        return 0

    def _headers_received(self, head: Any, sid: int, flags: int) -> None:
        fields = self._heads.pop(sid, [])
        self._block = []  # handed on: not kept until the next block (a reviewer's finding)
        event: Any
        if head.cat == HCAT_REQUEST:
            event = h2.events.RequestReceived(stream_id=sid, headers=fields)
            self._known.add(sid)
            self._opened_now.add(sid)
            # a request the library accepted, within the limit, earns its frames' allowance
            # (not a malformed one, which the library resets by itself: free to the peer)
            if sid not in self.over_limit and self.stream_opened is not None:
                self.stream_opened()
        elif self.client_side and sid not in self._answered:
            status = next((value for name, value in fields if name == b":status"), b"")
            if status[:1] == b"1":
                event = h2.events.InformationalResponseReceived(stream_id=sid, headers=fields)
            else:
                event = h2.events.ResponseReceived(stream_id=sid, headers=fields)
                self._answered.add(sid)
        else:
            event = h2.events.TrailersReceived(stream_id=sid, headers=fields)
        self._events.append(event)
        if flags & FLAG_END_STREAM:
            event.stream_ended = self._ended(sid)

    def _ended(self, sid: int) -> h2.events.StreamEnded:
        ended = h2.events.StreamEnded(stream_id=sid)
        self._events.append(ended)
        return ended

    def _settings_received(self, frame: int, flags: int) -> None:
        if flags & FLAG_ACK:
            self._events.append(h2.events.SettingsAcknowledged())
            return
        settings = _SettingsFrame.from_address(frame)
        changed = {}
        for i in range(settings.niv):
            entry = settings.iv[i]
            try:
                code: int = h2.settings.SettingCodes(entry.settings_id)
            except ValueError:
                code = entry.settings_id
            changed[code] = h2.settings.ChangedSetting(code, None, entry.value)
        event = h2.events.RemoteSettingsChanged()
        event.changed_settings = changed
        self._events.append(event)

    def _on_stream_close(self, sid: int, code: int) -> int:
        self._open_inbound.discard(sid)
        self.over_limit.discard(sid)
        self._answered.discard(sid)
        if self._heads.pop(sid, None) is self._block:  # a block cut off by the close
            self._block = []
        chunks = self._chunks.pop(sid, None)
        if chunks:  # a DATA frame cut off by the close: never handed on, its credit back
            size = sum(len(c) for c in chunks)
            self._received -= size
            self._lib.nghttp2_session_consume_connection(self._session, size)
        self._drop(sid)
        if sid in self._known:
            self._known.discard(sid)
            if code:  # the library reset it (a stream error): the sidecar must know
                self._events.append(h2.events.StreamReset(stream_id=sid, error_code=code,
                                                          remote_reset=False))
        return 0

    def _on_error(self, _code: int, message: int, length: int) -> int:
        self.error_message = ctypes.string_at(message, length).decode("utf-8", "replace")
        return 0

    # ------------------------------------------------------------ sending

    def data_to_send(self, amount: int | None = None) -> bytes:
        self._started = True
        pending, self._pending = self._pending, b""
        out = self._mem_send()
        return pending + out if pending else out

    def _mem_send(self) -> bytes:
        lib, session = self._lib, self._session
        parts = []
        data = _vp()
        while True:
            n = lib.nghttp2_session_mem_send(session, ctypes.byref(data))
            if n <= 0:
                break
            parts.append(_string_at(data.value or 0, n))
        error, self._error = self._error, None
        if error is not None:
            raise error
        if n < 0:
            raise h2.exceptions.ProtocolError(self._strerror(n))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _exists(self, sid: int) -> None:
        if not self._lib.nghttp2_session_find_stream(self._session, sid):
            raise h2.exceptions.StreamClosedError(sid)

    def send_headers(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]],
                     end_stream: bool = False, **_: Any) -> None:
        lib, session = self._lib, self._session
        out = self._sending.get(stream_id)
        if out is not None:  # a trailer section, after the body the provider still holds
            if out.ended:
                raise h2.exceptions.StreamClosedError(stream_id)
            out.trailers = list(headers)
            out.ended = True
            self._resume(stream_id, out)
            return
        nva, count = _nva(headers)
        provider = None
        if not end_stream:
            out = _Outgoing()
            provider = ctypes.byref(_PROVIDER)
        if self.client_side and stream_id not in self._known:
            sid = lib.nghttp2_submit_request(session, None, nva, count, provider, None)
            self._check(sid)
            if sid != stream_id:
                raise h2.exceptions.ProtocolError(f"stream {stream_id} opened as {sid}")
            self._known.add(sid)
        else:
            self._exists(stream_id)
            self._check(lib.nghttp2_submit_response(session, stream_id, nva, count, provider))
        if out is not None:
            self._sending[stream_id] = out

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False,
                  **_: Any) -> None:
        out = self._sending.get(stream_id)
        if out is None or out.ended:
            raise h2.exceptions.StreamClosedError(stream_id)
        if data:
            out.chunks.append(data if type(data) is bytes else bytes(data))
            out.size += len(data)
            self._queued += len(data)
        if end_stream:
            out.ended = True
        self._resume(stream_id, out)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def _resume(self, stream_id: int, out: _Outgoing) -> None:
        if out.deferred:
            out.deferred = False
            self._lib.nghttp2_session_resume_data(self._session, stream_id)

    def _read(self, sid: int, buf: int, length: int, flags: Any, _source: int) -> int:
        out = self._sending.get(sid)
        if out is None:  # being reset: no more DATA, and no END_STREAM
            return ERR_DEFERRED
        n = 0
        chunks = out.chunks
        while chunks and n < length:
            chunk = chunks[0]
            take = min(len(chunk), length - n)
            ctypes.memmove(buf + n, chunk, take)
            n += take
            if take == len(chunk):
                del chunks[0]
            else:
                chunks[0] = chunk[take:]
        out.size -= n
        self._queued -= n
        if not chunks and out.ended:
            del self._sending[sid]
            if out.trailers is not None:
                flags[0] = DATA_FLAG_EOF | DATA_FLAG_NO_END_STREAM
                nva, count = _nva(out.trailers)
                rv = self._lib.nghttp2_submit_trailer(self._session, sid, nva, count)
                if rv < 0:
                    return ERR_CALLBACK_FAILURE
            else:
                flags[0] = DATA_FLAG_EOF
            return n
        if n == 0:
            out.deferred = True
            return ERR_DEFERRED
        return n

    def local_flow_control_window(self, stream_id: int) -> int:
        lib, session = self._lib, self._session
        stream = lib.nghttp2_session_get_stream_remote_window_size(session, stream_id)
        if stream < 0:
            if not (self.client_side and stream_id in self._known):
                raise h2.exceptions.StreamClosedError(stream_id)
            # a request whose HEADERS the library has not sent yet (it opens the stream
            # then): the peer's initial window
            stream = lib.nghttp2_session_get_remote_settings(session, SETTINGS_INITIAL_WINDOW)
        out = self._sending.get(stream_id)
        stream -= out.size if out is not None else 0
        connection = lib.nghttp2_session_get_remote_window_size(session) - self._queued
        return max(0, min(stream, connection))

    def unacknowledged(self) -> int:
        """DATA bytes received that the sidecar has not yet given credit for."""
        return self._received - self._acknowledged

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        self._acknowledged += acknowledged_size
        self._lib.nghttp2_session_consume(self._session, stream_id, acknowledged_size)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        if not (self.client_side and stream_id in self._known):  # (a request not yet sent:
            self._exists(stream_id)  # the library drops its HEADERS)
        self._known.discard(stream_id)
        # What was given for the stream goes out first, as far as the windows allow: the
        # library drops a stream's frames not yet sent once RST_STREAM is submitted for it
        # (an answer, then NO_ERROR to stop the request's body, RFC 9113 §8.1, would lose
        # the answer)
        self._pending += self._mem_send()
        self._drop(stream_id)
        self._check(self._lib.nghttp2_submit_rst_stream(self._session, 0, stream_id,
                                                        int(error_code)))

    def _drop(self, stream_id: int) -> None:
        out = self._sending.pop(stream_id, None)
        if out is not None:
            self._queued -= out.size

    def close_connection(self, error_code: int = 0, additional_data: bytes | None = None,
                         last_stream_id: int | None = None) -> None:
        if self.library_goaway is not None and not error_code:
            return  # the library's GOAWAY said it already; a NO_ERROR one would only muddle it
        if last_stream_id is None:
            last_stream_id = 0 if self.client_side else self.highest_inbound_stream_id
        data = additional_data or b""
        self.goaway_sent = True
        self._check(self._lib.nghttp2_submit_goaway(self._session, 0, last_stream_id,
                                                    int(error_code), data or None, len(data)))


def _on_header(_session: int, _frame: int, name: int, namelen: int, value: int,
               valuelen: int, _flags: int, key: int) -> int:
    """The callback of each field of a header block, the most frequent one (two dozen in a
    proxied unary call): :func:`_guarded`'s rule, and the field added to the block begun last
    (:meth:`NgConnection._on_begin_headers`), without a method call."""
    ref = _machines.get(key)
    machine = ref() if ref is not None else None
    if machine is None:
        return ERR_CALLBACK_FAILURE
    size = machine._block_size + namelen + valuelen + 32
    machine._block_size = size
    if size > HEADER_BLOCK_LIMIT:
        return _failed(machine, h2.exceptions.ProtocolError(
            f"a header block decodes to over {HEADER_BLOCK_LIMIT} bytes"))
    try:
        machine._block.append((_string_at(name, namelen), _string_at(value, valuelen)))
    except BaseException as exc:  # raised again by the caller of the library
        return _failed(machine, exc)
    return 0


_THUNKS = {
    "on_begin_frame": _ON_BEGIN_FRAME(_guarded("on_begin_frame", NgConnection._on_begin_frame)),
    "on_begin_headers": _ON_FRAME(_guarded("on_begin_headers",
                                           NgConnection._on_begin_headers)),
    "on_header": _ON_HEADER(_on_header),
    "on_frame_recv": _ON_FRAME(_guarded("on_frame_recv", NgConnection._on_frame_recv)),
    "on_data_chunk_recv": _ON_DATA(_guarded("on_data_chunk_recv",
                                            NgConnection._on_data_chunk)),
    "on_stream_close": _ON_CLOSE(_guarded("on_stream_close", NgConnection._on_stream_close)),
}
_ERROR_THUNK = _ON_ERROR(_guarded("error", NgConnection._on_error))
_IGNORE_EXTENSION = _UNPACK_EXTENSION(lambda *_: ERR_CANCEL)  # counted, then ignored
_EXTENSION_CHUNK = _ON_EXTENSION_CHUNK(lambda *_: 0)
_PROVIDER = _DataProvider(None, _READ(_guarded("read", NgConnection._read)))


ENGINE_VARIABLE = "EQUILIBRIUM_H2_ENGINE"
ENGINES = ("auto", "nghttp2", "h2")


def engine() -> str:
    """The HTTP/2 engine this process uses: ``nghttp2`` or ``h2``, as
    ``EQUILIBRIUM_H2_ENGINE`` asks (``auto``, the default: nghttp2 where the library loads).
    ValueError for another value, or for ``nghttp2`` where the library does not load."""
    wanted = os.environ.get(ENGINE_VARIABLE, "auto").strip().lower() or "auto"
    if wanted not in ENGINES:
        raise ValueError(f"{ENGINE_VARIABLE}={wanted!r}: choose one of {', '.join(ENGINES)}")
    if wanted == "h2":
        return "h2"
    if library() is None:
        if wanted == "nghttp2":
            raise ValueError(f"{ENGINE_VARIABLE}=nghttp2, but {SONAME} (1.52 or later) does not "
                             "load here")
        return "h2"
    return "nghttp2"


def connection(*, client_side: bool) -> NgConnection | None:
    """A new connection on libnghttp2, or None where the sidecar uses ``h2``."""
    try:
        chosen = engine()
    except ValueError:  # said at start (sidecar.runner); the pure-Python engine meanwhile
        return None
    return NgConnection(library(), client_side=client_side) if chosen == "nghttp2" else None
