"""sidecar.h2_server: the ``h2`` server connection that lists streams beyond the announced
SETTINGS_MAX_CONCURRENT_STREAMS instead of ending the connection (sans I/O: two ``h2`` state
machines exchanging bytes in memory)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.settings import SettingCodes

from sidecar.h2_server import _RefusingH2

pytestmark = pytest.mark.http2  # run again on the other engine by make test


class _Greedy(h2.connection.H2Connection):
    @property
    def open_outbound_streams(self) -> int:
        return 0


def _pair(limit: int) -> tuple[_Greedy, _RefusingH2]:
    client = _Greedy(h2.config.H2Configuration(client_side=True, header_encoding=None))
    server = _RefusingH2(config=h2.config.H2Configuration(client_side=False,
                                                          header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    server.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: limit})
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())  # the ACK: the limit is in force
    assert server.local_settings.max_concurrent_streams == limit
    return client, server


def _request(client: _Greedy, n: int) -> int:
    stream = client.get_next_available_stream_id()
    client.send_headers(stream, [(b":method", b"GET"), (b":scheme", b"http"),
                                 (b":path", b"/p%d" % n), (b":authority", b"svc"),
                                 (b"x-same", b"value kept in the HPACK table")])
    return stream


def test_streams_beyond_the_limit_are_listed_and_their_headers_decoded() -> None:
    client, server = _pair(limit=2)
    streams = [_request(client, n) for n in range(4)]
    events = server.receive_data(client.data_to_send())
    requests = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert [e.stream_id for e in requests] == streams  # no connection error
    assert [dict(e.headers)[b":path"] for e in requests] == [b"/p0", b"/p1", b"/p2", b"/p3"]
    assert server.over_limit == set(streams[2:])
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


def test_within_the_limit_nothing_is_listed() -> None:
    client, server = _pair(limit=3)
    for n in range(3):
        _request(client, n)
    server.receive_data(client.data_to_send())
    assert server.over_limit == set()
