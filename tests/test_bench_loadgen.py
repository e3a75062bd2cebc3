"""The mesh benchmark's load tool and arithmetic: figures a reader of bench/results/mesh.md relies on.

The open-loop client must charge a server stall to every request that was due during it (a closed-loop
client would record one slow request and hide the rest), the bulk sender must only report transfers the
sink confirmed, and "added latency" must compare mesh and direct round by round.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest

from bench import loadgen, meshreport

STALL_AFTER = 50  # requests answered before the server stalls once
STALL_S = 0.3


@pytest.fixture
def stalling_echo():
    """An echo server on loopback that holds its answers once, for STALL_S, after STALL_AFTER requests."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    conns: list[socket.socket] = []

    def handle(conn: socket.socket) -> None:
        answered = 0
        stalled = False
        with conn:
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                answered += len(data)
                if not stalled and answered >= (STALL_AFTER + 1) * loadgen.REQUEST_SIZE:
                    stalled = True
                    time.sleep(STALL_S)
                conn.sendall(data)

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            conns.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        srv.close()
        t.join(5)


def test_a_stall_is_charged_to_every_request_due_during_it(stalling_echo):
    out = loadgen.rate_run("127.0.0.1", stalling_echo, rate=200, conns=1, seconds=1.5, warmup=0)
    lat = out["latencies_us"]
    assert out["completed"] == out["requests"] == 300 and out["lost"] == 0
    # Requests keep their schedule through the stall (open loop): the ~60 due during it each wait for
    # the rest of it. A client that waited for each answer before sending would show one slow request.
    slow = [x for x in lat if x >= 0.1 * 1e6]
    assert len(slow) >= 20, sorted(lat)[-25:]
    assert lat == sorted(lat)


def test_bulk_counts_only_what_the_sink_confirmed():
    sink = socket.create_server(("127.0.0.1", 0))

    def serve_one(confirm: int | None) -> None:
        conn, _ = sink.accept()
        with conn:
            got = 0
            while chunk := conn.recv(1 << 20):
                got += len(chunk)
            if confirm is not None:
                conn.sendall((got if confirm < 0 else confirm).to_bytes(8, "big"))

    try:
        t = threading.Thread(target=serve_one, args=(-1,), daemon=True)
        t.start()
        out = loadgen.bulk("127.0.0.1", sink.getsockname()[1], 8)
        assert out["bytes"] == 8 << 20 and out["mbps"] > 0
        t.join(10)

        t = threading.Thread(target=serve_one, args=(12345,), daemon=True)  # the sink saw other than was sent
        t.start()
        with pytest.raises(ConnectionError, match="sink received 12345"):
            loadgen.bulk("127.0.0.1", sink.getsockname()[1], 2)
        t.join(10)

        t = threading.Thread(target=serve_one, args=(None,), daemon=True)  # the path closed, no count
        t.start()
        with pytest.raises(ConnectionError, match="before the sink reported"):
            loadgen.bulk("127.0.0.1", sink.getsockname()[1], 1)
        t.join(10)
    finally:
        sink.close()


def test_bad_arguments_give_a_json_error_naming_them(capsys):
    assert loadgen.main(["rate", "127.0.0.1", "9", "--rate", "0"]) == 1
    err = json.loads(capsys.readouterr().out)["error"]
    assert "rate" in err and "positive" in err


def _rate_run(p90: float) -> dict:
    return {"p50": p90 / 2, "p90": p90, "p99": p90 * 2, "max": p90 * 3, "lost": 0, "achieved_rate": 1000.0,
            "max_send_lag_us": 100, "completed": 4000, "cpu_s": {}, "runq_s": {}}


def test_added_latency_is_paired_by_round():
    # Round 2 was slow for both modes (the machine was busy): that is not the mesh's doing. Round 3 is.
    direct = [_rate_run(p) for p in (0.1, 1.0, 0.2)]
    mesh = [_rate_run(p) for p in (0.3, 1.2, 1.5)]
    summary = meshreport.summarize_rate({"direct": direct, "mesh": mesh})
    assert summary["mesh"]["added"]["p90"] == pytest.approx(0.2)
    assert summary["mesh"]["p90"] == pytest.approx(1.2)  # the plain median over rounds, for the table


def test_goals_report_how_far_off_a_missed_one_is():
    summary = {
        "bulk": {"mesh": {"vs_direct": 0.25}},
        "rate": {"mesh": {"added": {"p90": 0.4},
                          "cpu_s_per_1000": {"agent-node-a": 0.3, "agent-node-b": 0.1, "total": 0.4}}},
        "hundred_pods": {"pods_on_node": 100, "memory_ready": {"rss": 50.0}, "memory_after": {"rss": 90.0}},
    }
    rows = {r["goal"].split(" (")[0]: r for r in meshreport.goal_rows(summary, {
        "bulk_ratio_min": 0.5, "added_p90_ms_max": 0.5, "cpu_s_per_1000_max": 0.15, "rss_mib_max": 60.0})}
    assert rows["mesh bulk / direct bulk"]["met"] is False
    assert rows["mesh bulk / direct bulk"]["miss_factor"] == pytest.approx(2.0)
    assert rows["p90 added by the mesh"]["met"] is True
    cpu = next(r for name, r in rows.items() if name.startswith("agent CPU"))
    assert cpu["measured"] == pytest.approx(0.3) and cpu["miss_factor"] == pytest.approx(2.0)  # the busier agent
    rss = next(r for name, r in rows.items() if name.startswith("agent RSS"))
    assert rss["measured"] == pytest.approx(90.0) and not rss["met"]  # the larger of ready and after load
