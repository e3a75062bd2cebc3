"""The sans-IO HBONE session: two sessions talking through memory, no sockets, no clock.

Covers what the asyncio shell relies on: per-stream decisions, flow-control queueing and release,
half-close, graceful GOAWAY, and that any byte sequence from a peer yields events, never an exception.
"""

from __future__ import annotations

import struct

import pytest
from h2.errors import ErrorCodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.hbone.constants import CLIENT_LIMITS, SERVER_LIMITS, HboneLimits
from mesh.hbone.errors import ConnectionClosedError
from mesh.hbone.h2conn import PREFACE
from mesh.hbone.protocol import build_connect_headers
from mesh.hbone.session import (
    DataReceived,
    GoAwayReceived,
    HboneSession,
    PingAcknowledged,
    ProtocolViolation,
    RequestReceived,
    RequestRejected,
    ResponseReceived,
    StreamDrained,
    StreamEnded,
    StreamReset,
)

MIB = 1024 * 1024


def pump(client: HboneSession, server: HboneSession) -> tuple[list, list]:
    """Move bytes both ways until both sides are quiet; returns (client events, server events)."""
    ce: list = []
    se: list = []
    for _ in range(10_000):
        to_server = b"".join(bytes(x) for x in client.take_output())
        to_client = b"".join(bytes(x) for x in server.take_output())
        if not to_server and not to_client:
            return ce, se
        if to_server:
            se += server.receive_data(to_server)
        if to_client:
            ce += client.receive_data(to_client)
    raise AssertionError("sessions never went quiet")


def connected(server_limits: HboneLimits = SERVER_LIMITS) -> tuple[HboneSession, HboneSession]:
    client, server = HboneSession(True, CLIENT_LIMITS), HboneSession(False, server_limits)
    client.initiate()
    server.initiate()
    pump(client, server)
    return client, server


def of(events: list, cls: type) -> list:
    return [e for e in events if isinstance(e, cls)]


def open_tunnel(client: HboneSession, server: HboneSession, authority: str = "10.0.0.2:8080") -> int:
    sid = client.send_request(build_connect_headers(authority, forwarded='for="10.0.0.1:3333"'))
    _, se = pump(client, server)
    (req,) = of(se, RequestReceived)
    assert req.stream_id == sid and str(req.request.authority) == authority
    server.respond(sid, 200)
    ce, _ = pump(client, server)
    (resp,) = of(ce, ResponseReceived)
    assert resp.response.status == 200
    return sid


def test_settings_are_in_force_from_the_first_frame() -> None:
    client, server = connected()
    assert client.h2.max_outbound_frame_size == SERVER_LIMITS.max_frame_size
    assert client.peer_max_streams == SERVER_LIMITS.max_concurrent_streams
    assert client.h2.outbound_flow_control_window == SERVER_LIMITS.connection_window
    assert server.h2.remote_settings.enable_push == 0


def test_data_both_ways_in_max_size_frames() -> None:
    client, server = connected()
    sid = open_tunnel(client, server)
    payload = bytes(range(256)) * (3 * MIB // 256)
    client.send_data(sid, payload)
    _, se = pump(client, server)
    frames = of(se, DataReceived)
    assert [len(f.data) for f in frames] == [MIB, MIB, MIB]
    assert b"".join(f.data for f in frames) == payload
    server.send_data(sid, b"reply")
    ce, _ = pump(client, server)
    assert [f.data for f in of(ce, DataReceived)] == [b"reply"]


def test_flow_control_queues_until_the_consumer_acknowledges() -> None:
    client, server = connected()
    sid = open_tunnel(client, server)
    client.send_data(sid, b"a" * (5 * MIB))
    _, se = pump(client, server)
    assert sum(len(e.data) for e in of(se, DataReceived)) == 4 * MIB  # the stream window
    assert client.pending(sid) == MIB
    ce, se = pump(client, server)  # nothing moves until the consumer has taken data
    assert client.pending(sid) == MIB and not of(se, DataReceived)
    server.acknowledge(sid, MIB)
    ce, se = pump(client, server)
    assert client.pending(sid) == 0
    assert of(ce, StreamDrained) == [StreamDrained(sid)]
    assert sum(len(e.data) for e in of(se, DataReceived)) == MIB


def test_connection_window_is_shared_and_bigger_than_a_stream_window() -> None:
    client, server = connected()
    sids = [open_tunnel(client, server, f"10.0.0.2:{8000 + i}") for i in range(5)]
    for sid in sids:
        client.send_data(sid, b"b" * (4 * MIB))
    _, se = pump(client, server)
    got = {sid: 0 for sid in sids}
    for e in of(se, DataReceived):
        got[e.stream_id] += len(e.data)
    assert sum(got.values()) == 16 * MIB - 65535 + 65535  # exactly the connection window
    assert sum(client.pending(s) for s in sids) == 4 * MIB


def test_end_stream_after_queued_data_and_half_close_each_way() -> None:
    client, server = connected()
    sid = open_tunnel(client, server)
    client.send_data(sid, b"x" * (5 * MIB), end_stream=True)
    _, se = pump(client, server)
    assert not of(se, StreamEnded)  # END_STREAM waits behind the queued MiB
    server.acknowledge(sid, 4 * MIB)
    _, se = pump(client, server)
    assert of(se, StreamEnded) == [StreamEnded(sid)]
    with pytest.raises(ConnectionResetError):
        client.send_data(sid, b"more")
    server.send_data(sid, b"still talking back", end_stream=True)
    ce, _ = pump(client, server)
    assert [e.data for e in of(ce, DataReceived)] == [b"still talking back"]
    assert of(ce, StreamEnded) == [StreamEnded(sid)]
    assert client.open_streams == 0 and server.open_streams == 0


def test_a_bad_request_is_answered_without_touching_other_streams() -> None:
    client, server = connected()
    good = open_tunnel(client, server)
    bad = client.send_request([(b":method", b"GET"), (b":authority", b"10.0.0.2:80"), (b":scheme", b"https"),
                               (b":path", b"/")])
    ce, se = pump(client, server)
    (rej,) = of(se, RequestRejected)
    assert (rej.stream_id, rej.rejection.status, rej.rejection.reason) == (bad, 400, "method")
    (resp,) = of(ce, ResponseReceived)
    assert (resp.stream_id, resp.response.status) == (bad, 400)
    client.send_data(good, b"unaffected")
    _, se = pump(client, server)
    assert [e.data for e in of(se, DataReceived)] == [b"unaffected"]
    assert not server.closed


def test_trailers_on_a_connect_stream_reset_only_that_stream() -> None:
    client, server = connected()
    sid = open_tunnel(client, server)
    other = open_tunnel(client, server, "10.0.0.2:9")
    client.h2.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
    ce, se = pump(client, server)
    (reset,) = of(se, StreamReset)
    assert (reset.stream_id, reset.error_code, reset.remote) == (sid, ErrorCodes.PROTOCOL_ERROR, False)
    assert of(ce, StreamReset)[0].stream_id == sid
    client.send_data(other, b"fine")
    _, se = pump(client, server)
    assert [e.data for e in of(se, DataReceived)] == [b"fine"]


def test_malformed_response_resets_the_stream_on_the_client() -> None:
    client, server = connected()
    sid = client.send_request(build_connect_headers("10.0.0.2:80"))
    pump(client, server)
    server.h2.send_headers(sid, [(b":status", b"2xx")])
    ce, _ = pump(client, server)
    (reset,) = of(ce, StreamReset)
    assert reset.stream_id == sid and "malformed response" in reset.reason


def test_graceful_goaway_lets_open_streams_finish_and_refuses_new_ones() -> None:
    client, server = connected()
    sid = open_tunnel(client, server)
    last = server.goaway_graceful()
    ce, _ = pump(client, server)
    assert of(ce, GoAwayReceived) == [GoAwayReceived(0, last, True)]
    assert client.draining and not client.closed
    client.send_data(sid, b"in flight")
    server.send_data(sid, b"answer")
    ce, se = pump(client, server)
    assert [e.data for e in of(se, DataReceived)] == [b"in flight"]
    assert [e.data for e in of(ce, DataReceived)] == [b"answer"]
    with pytest.raises(ConnectionClosedError):
        client.send_request(build_connect_headers("10.0.0.2:80"))
    # A client that ignores the GOAWAY gets REFUSED_STREAM for the new stream only.
    late = client.h2.get_next_available_stream_id()
    client.h2.send_headers(late, build_connect_headers("10.0.0.2:80"))
    ce, se = pump(client, server)
    assert [(e.stream_id, e.error_code) for e in of(ce, StreamReset)] == [(late, ErrorCodes.REFUSED_STREAM)]
    assert not of(se, RequestReceived)


def test_ping_round_trip() -> None:
    client, server = connected()
    opaque = client.ping()
    ce, _ = pump(client, server)
    assert of(ce, PingAcknowledged) == [PingAcknowledged(opaque)]


def test_bad_preface_is_a_violation_with_goaway() -> None:
    server = HboneSession(False, SERVER_LIMITS)
    server.initiate()
    server.take_output()
    (event,) = server.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    assert isinstance(event, ProtocolViolation) and event.reason == "bad_preface"
    out = b"".join(bytes(x) for x in server.take_output())
    assert out[3] == 0x7 and struct.unpack(">L", out[13:17])[0] == ErrorCodes.PROTOCOL_ERROR  # GOAWAY
    assert server.closed and server.receive_data(PREFACE) == []


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    client, server = connected()
    sid = open_tunnel(client, server)
    header = struct.pack(">L", 2 * MIB)[1:] + b"\x00\x00" + struct.pack(">L", sid)
    (event,) = server.receive_data(header)  # no body was ever sent
    assert isinstance(event, ProtocolViolation) and event.reason == "frame_too_large"
    assert event.error_code == ErrorCodes.FRAME_SIZE_ERROR


# ---- fuzz ----------------------------------------------------------------------------------------------

_frame = st.builds(
    lambda t, f, sid, body: struct.pack(">L", len(body))[1:] + bytes([t, f]) + struct.pack(">L", sid) + body,
    st.integers(0, 12), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1, 2**32 - 1]),
    st.binary(max_size=64),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(_frame | st.binary(max_size=40), max_size=12), st.booleans())
def test_any_frames_from_a_client_give_events_never_exceptions(chunks, open_first) -> None:
    client, server = connected()
    if open_first:
        open_tunnel(client, server)
    for chunk in chunks:
        events = server.receive_data(chunk)
        assert isinstance(events, list)
        if any(isinstance(e, ProtocolViolation) for e in events):
            assert server.closed
            out = b"".join(bytes(x) for x in server.take_output())
            assert b"\x07\x00\x00\x00\x00\x00" in out  # a GOAWAY frame on stream 0 went out
            break
        server.take_output()
        for e in of(events, RequestReceived):
            server.respond(e.stream_id, 200)  # answering must not raise either


@settings(max_examples=200, deadline=None)
@given(st.lists(_frame | st.binary(max_size=40), max_size=12))
def test_any_frames_from_a_server_give_events_never_exceptions(chunks) -> None:
    client, server = connected()
    open_tunnel(client, server)
    client.send_request(build_connect_headers("10.0.0.2:80"))
    client.take_output()
    for chunk in chunks:
        events = client.receive_data(chunk)
        assert isinstance(events, list)
        if client.closed:
            break
