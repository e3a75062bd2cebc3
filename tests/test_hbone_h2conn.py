"""The h2 subclass under HBONE: framing over one reusable buffer, zero-copy DATA out, h2 hooks pinned.

These pin the private h2 4.x behaviour ``mesh.hbone.h2conn`` relies on, so an h2 upgrade that changes
it fails here rather than in production.
"""

from __future__ import annotations

import h2.events as h2ev
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hbone.constants import CLIENT_LIMITS, SERVER_LIMITS
from mesh.hbone.h2conn import HboneH2Connection, QuietDataFrame
from mesh.hbone.protocol import build_connect_headers

MIB = 1024 * 1024


def handshake() -> tuple[HboneH2Connection, HboneH2Connection, bytes]:
    client = HboneH2Connection(client_side=True, limits=CLIENT_LIMITS)
    server = HboneH2Connection(client_side=False, limits=SERVER_LIMITS)
    client.initiate_connection()
    server.initiate_connection()
    client.receive_data(server.data_to_send())
    head = client.data_to_send()
    return client, server, head


def conversation() -> tuple[bytes, list[tuple[str, int, bytes]]]:
    """Client bytes for: preface, SETTINGS, 3 CONNECTs, DATA of mixed sizes, END_STREAM; and the expectation."""
    client, _server, head = handshake()
    out = bytearray(head)
    expected: list[tuple[str, int, bytes]] = []
    for i, size in enumerate([0, 5, 70_000, 1 * MIB, 300_001]):
        sid = client.get_next_available_stream_id() if i < 3 else [1, 3, 5][i - 3]
        if i < 3:
            client.send_headers(sid, build_connect_headers(f"10.0.0.{i + 1}:80"))
            expected.append(("request", sid, b""))
        if size:
            data = bytes([i]) * size
            client.send_data(sid, data)
            expected.append(("data", sid, data))
        out += client.data_to_send()
    client.end_stream(5)
    expected.append(("end", 5, b""))
    out += client.data_to_send()
    return bytes(out), expected


def summarize(events: list) -> list[tuple[str, int, bytes]]:
    out: list[tuple[str, int, bytes]] = []
    for e in events:
        if isinstance(e, h2ev.RequestReceived):
            out.append(("request", e.stream_id, b""))
        elif isinstance(e, h2ev.DataReceived) and e.data:
            if out and out[-1][0] == "data" and out[-1][1] == e.stream_id:
                out[-1] = ("data", e.stream_id, out[-1][2] + e.data)
            else:
                out.append(("data", e.stream_id, e.data))
        elif isinstance(e, h2ev.StreamEnded):
            out.append(("end", e.stream_id, b""))
    return out


CONVERSATION, EXPECTED = conversation()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 400_000), max_size=30))
def test_frames_split_anywhere_parse_the_same(cuts) -> None:
    """TCP/TLS may cut the stream anywhere: via add_data or via get_buffer/commit, same events."""
    server = HboneH2Connection(client_side=False, limits=SERVER_LIMITS)
    server.initiate_connection()
    events: list = []
    pos = 0
    use_buffer = False
    for cut in [*cuts, len(CONVERSATION)]:
        piece = CONVERSATION[pos : pos + cut]
        pos += len(piece)
        if use_buffer:
            view = server.incoming_buffer.get_buffer()
            n = min(len(view), len(piece))
            view[:n] = piece[:n]
            events += server.receive_committed(n)
            if n < len(piece):
                events += server.receive_data(piece[n:])
        else:
            events += server.receive_data(piece)
        use_buffer = not use_buffer
        if pos >= len(CONVERSATION):
            break
    assert summarize(events) == EXPECTED


def test_received_data_frames_do_not_hex_dump_their_payload() -> None:
    client, server, head = handshake()
    server.receive_data(head)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, build_connect_headers("10.0.0.1:80"))
    client.send_data(sid, b"\xab" * 100_000)
    seen = []
    original = server._receive_data_frame

    def spy(frame):
        seen.append(frame)
        return original(frame)

    server._frame_dispatch_table[QuietDataFrame] = spy
    server.receive_data(client.data_to_send())
    assert [type(f) for f in seen] == [QuietDataFrame]
    assert "length=100000" in repr(seen[0]) and "abab" not in repr(seen[0])


def test_large_data_goes_out_without_a_copy_small_data_in_one_buffer() -> None:
    client, server, head = handshake()
    server.receive_data(head)
    client.receive_data(server.data_to_send())
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, build_connect_headers("10.0.0.1:80"))
    client.take_output()
    big = b"q" * (256 * 1024)
    client.send_data(sid, big)
    out = client.take_output()
    assert len(out) == 2 and out[1] is big  # 9-byte header, then the caller's own object
    assert out[0][:3] == len(big).to_bytes(3, "big") and out[0][3] == 0
    client.send_data(sid, b"small", end_stream=True)
    (frame,) = client.take_output()
    assert frame == b"\x00\x00\x05\x00\x01" + sid.to_bytes(4, "big") + b"small"


def test_h2_private_hooks_still_behave_as_relied_upon() -> None:
    client = HboneH2Connection(client_side=True, limits=CLIENT_LIMITS)
    assert client._frame_dispatch_table[QuietDataFrame] == client._receive_data_frame
    client.initiate_connection()
    assert client.data_to_send().startswith(b"PRI * HTTP/2.0")  # _data_to_send is still flushed in order
    assert client.local_settings.initial_window_size == CLIENT_LIMITS.stream_window
    assert client.local_settings.max_frame_size == CLIENT_LIMITS.max_frame_size
    assert client.decoder.max_header_list_size == CLIENT_LIMITS.max_header_list_size
    assert client._inbound_flow_control_window_manager.current_window_size == CLIENT_LIMITS.connection_window


def test_borrowed_data_is_a_view_into_the_receive_buffer() -> None:
    """The shell's mode: payloads are not copied on the way in; the default mode hands out bytes."""
    for borrow, kind in ((True, memoryview), (False, bytes)):
        client = HboneH2Connection(client_side=True, limits=CLIENT_LIMITS)
        server = HboneH2Connection(client_side=False, limits=SERVER_LIMITS, borrow_data=borrow)
        client.initiate_connection()
        server.initiate_connection()
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, build_connect_headers("10.0.0.1:80"))
        client.send_data(sid, b"payload" * 1000)
        wire = client.data_to_send()
        view = server.incoming_buffer.get_buffer()
        view[: len(wire)] = wire
        (data,) = [e.data for e in server.receive_committed(len(wire)) if isinstance(e, h2ev.DataReceived)]
        assert isinstance(data, kind)
        assert bytes(data) == b"payload" * 1000
