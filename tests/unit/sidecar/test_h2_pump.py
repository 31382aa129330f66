"""sidecar.h2_proxy.pump_at_once: a unary call's request relayed without a task, exactly as
pump_request would relay it, or left whole to the task when any of it would wait.

The app's side is a real :class:`sidecar.h2_connection.H2Stream` (its inbox, its credit given
back through its connection); the upstream side records what it was asked to send."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.h2_connection import H2Stream, StreamGone
from sidecar.h2_proxy import _Replay, pump_at_once


class Credit:
    """The app's connection, as far as a stream's ``ack`` reaches it."""

    def __init__(self) -> None:
        self.given = 0

    def acknowledge(self, stream_id: int, size: int) -> None:
        self.given += size


class Upstream:
    """The upstream stream's sending side: what was sent, in order."""

    def __init__(self, window: int | None = 65535, fail_after: int | None = None) -> None:
        self.window = window
        self.fail_after = fail_after  # sends that go through before the stream is gone
        self.sent: list[tuple[str, Any]] = []

    def window_now(self) -> int | None:
        return self.window

    def _send(self, item: tuple[str, Any]) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise StreamGone(None, "stream reset")
        self.sent.append(item)

    def send_framed(self, data: bytes, end_stream: bool = False) -> None:
        self._send(("data", data))

    def send_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> None:
        self._send(("trailers", headers))

    def end(self) -> None:
        self._send(("end", None))


def app_stream(*items: tuple[str, Any, int]) -> tuple[H2Stream, Credit]:
    credit = Credit()
    stream = H2Stream(credit, 1)  # type: ignore[arg-type]
    for item in items:
        stream._push(*item)
    return stream, credit


def unread(stream: H2Stream) -> list[tuple[str, Any, int]]:
    items = []
    while stream.ready():
        items.append(stream._inbox.popleft())
    return items


def test_a_whole_request_goes_up_at_once_as_the_task_would_send_it() -> None:
    stream, credit = app_stream(("data", b"hello", 9), ("end", None, 0))
    upstream, replay = Upstream(), _Replay()
    assert pump_at_once(stream, upstream, replay) is True  # type: ignore[arg-type]
    assert upstream.sent == [("data", b"hello"), ("end", None)]
    assert credit.given == 9  # the frame's flow-controlled length (padding included)
    assert replay.items == [("data", b"hello"), ("end", None)] and replay.complete
    assert not stream.ready()


def test_trailers_go_up_filtered_and_end_the_request() -> None:
    """Trailers end the request (END_STREAM rides on them): the end item both engines queue
    after them is not sent again (an empty DATA frame on a closed stream: the pod's GOAWAY
    STREAM_CLOSED, as an integration test found) but left unread, as the task leaves it."""
    stream, _ = app_stream(("data", b"m", 1),
                           ("trailers", [(b"x-gt-price", b"1"), (b"k", b"v")], 0),
                           ("end", None, 0))
    upstream = Upstream()
    assert pump_at_once(stream, upstream, _Replay(),  # type: ignore[arg-type]
                        lambda block: [f for f in block if not f[0].startswith(b"x-gt")])
    assert upstream.sent == [("data", b"m"), ("trailers", [(b"k", b"v")])]
    assert unread(stream) == [("end", None, 0)]


@pytest.mark.parametrize(("items", "window"), [
    ([("data", b"part", 4)], 65535),  # the rest of the body is still on its way
    ([], 65535),  # nothing came yet
    ([("data", b"x" * 100, 100), ("end", None, 0)], 99),  # the window is short of it
    ([("data", b"x", 1), ("end", None, 0)], None),  # the upstream's socket is full
])
def test_what_would_wait_is_left_whole_to_the_task(items: list[tuple[str, Any, int]],
                                                   window: int | None) -> None:
    stream, credit = app_stream(*items)
    upstream = Upstream(window)
    assert pump_at_once(stream, upstream, _Replay()) is False  # type: ignore[arg-type]
    assert upstream.sent == [] and credit.given == 0
    assert unread(stream) == items


def test_a_second_attempt_goes_through_the_task_which_sends_the_first_again() -> None:
    stream, _ = app_stream(("data", b"x", 1), ("end", None, 0))
    replay = _Replay()
    replay.add("data", b"earlier")
    upstream = Upstream()
    assert pump_at_once(stream, upstream, replay) is False  # type: ignore[arg-type]
    assert upstream.sent == [] and len(unread(stream)) == 2


def test_a_stream_gone_midway_leaves_the_rest_unread_with_its_credit_owed() -> None:
    """As pump_request leaves it: the item that failed gave its credit back; what was not
    read stays in the inbox, for the handler's discard() to give back and count."""
    stream, credit = app_stream(("data", b"a", 3), ("data", b"b", 5),
                                ("trailers", [(b"k", b"v")], 0), ("end", None, 0))
    upstream = Upstream(fail_after=1)
    assert pump_at_once(stream, upstream, _Replay()) is True  # type: ignore[arg-type]
    assert upstream.sent == [("data", b"a")]
    assert credit.given == 3 + 5
    assert unread(stream) == [("trailers", [(b"k", b"v")], 0), ("end", None, 0)]
