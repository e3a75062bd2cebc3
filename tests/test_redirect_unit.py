"""Redirection pieces that need no namespace: annotation parsing, the routing and nftables
plans, input validation, the original-destination helper, state records, backend errors."""

from __future__ import annotations

import errno
import os
import socket
from ipaddress import IPv4Address, IPv4Network

import pytest

from agent.redirect import ebpf, nftables, routing
from agent.redirect import state as st
from agent.redirect.bpf_syscall import BpfError
from agent.redirect.controller import RedirectController
from agent.redirect.exclusions import (
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_OUTBOUND_IP_RANGES,
    CaptureExclusions,
    ExclusionError,
)
from agent.redirect.listeners import original_destination
from agent.redirect.model import PodNetInfo, RedirectError, RedirectUnavailable
from mesh.netns import NetnsError, NetnsWorker, netns_cookie, open_netns, run_in_netns

# --- annotations ----------------------------------------------------------------------------


def test_istio_annotations_parse_into_exclusions():
    ex = CaptureExclusions.from_annotations(
        {
            EXCLUDE_INBOUND_PORTS: "9090, 15020",
            EXCLUDE_OUTBOUND_PORTS: "5432",
            EXCLUDE_OUTBOUND_IP_RANGES: "10.0.0.0/8,192.168.1.7/32,fd00::/8",
            "unrelated/annotation": "x",
        }
    )
    assert ex.inbound_ports == {9090, 15020}
    assert ex.outbound_ports == {5432}
    # IPv6 ranges are accepted and dropped: capture is IPv4 only.
    assert ex.outbound_cidrs == (IPv4Network("10.0.0.0/8"), IPv4Network("192.168.1.7/32"))
    assert ex.capture_cidrs is None


def test_no_annotations_capture_everything():
    ex = CaptureExclusions.from_annotations({})
    assert not ex.inbound_ports and not ex.outbound_ports and not ex.outbound_cidrs
    assert ex.capture_cidrs is None
    assert CaptureExclusions.from_annotations({INCLUDE_OUTBOUND_IP_RANGES: "*"}).capture_cidrs is None


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        (EXCLUDE_INBOUND_PORTS, "80,http", "'http' is not a port number"),
        (EXCLUDE_OUTBOUND_PORTS, "70000", "port 70000 is outside 1-65535"),
        (EXCLUDE_OUTBOUND_PORTS, "0", "outside 1-65535"),
        (EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33", "'10.0.0.0/33' is not an IP range"),
        (INCLUDE_OUTBOUND_IP_RANGES, "*,10.0.0.0/8", "'*' must be the only entry"),
    ],
)
def test_bad_annotation_names_the_annotation_and_the_entry(key, value, needle):
    with pytest.raises(ExclusionError) as ei:
        CaptureExclusions.from_annotations({key: value})
    assert ei.value.annotation == key
    assert key in str(ei.value) and needle in str(ei.value)


def test_exclusions_survive_a_state_round_trip(tmp_path):
    ex = CaptureExclusions.from_annotations(
        {EXCLUDE_INBOUND_PORTS: "9090", INCLUDE_OUTBOUND_IP_RANGES: "10.244.0.0/16"}
    )
    rec = st.PodRecord(
        uid="ns/pod",
        netns_path="/run/netns/x",
        netns_cookie=7,
        netns_ino=9,
        ip=IPv4Address("10.1.2.3"),
        eth0="eth0",
        backend="ebpf",
        exclusions=ex,
        sysctls_before={"eth0/accept_local": 0},
    )
    st.save(str(tmp_path), rec)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o600"
    back = st.load(str(tmp_path), "ns/pod")
    assert back == rec
    st.delete(str(tmp_path), "ns/pod")
    assert st.load(str(tmp_path), "ns/pod") is None


def test_corrupt_state_file_is_reported_not_fatal(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    records, problems = st.load_all(str(tmp_path))
    assert records == [] and len(problems) == 1 and "broken.json" in problems[0]


# --- routing plan ---------------------------------------------------------------------------


def test_routing_plan_keeps_agent_excluded_and_node_traffic_off_the_capture_table():
    ex = CaptureExclusions.from_annotations(
        {EXCLUDE_INBOUND_PORTS: "9090", EXCLUDE_OUTBOUND_PORTS: "5432", EXCLUDE_OUTBOUND_IP_RANGES: "10.9.0.0/16"}
    )
    rules = routing.plan_rules(ex, (IPv4Network("10.244.1.1/32"),))
    text = [r.describe() for r in rules]
    assert text == [
        "9000: fwmark 0x539/0xfff lookup main",
        "9001: to 10.9.0.0/16 lookup main",
        "9001: to 10.244.1.1/32 lookup main",
        "9001: ipproto tcp dport 5432 lookup main",
        "9001: ipproto tcp sport 9090 lookup main",
        # The kernel's RST for a tunnel SYN while the agent is down must reach the remote agent.
        "9001: ipproto tcp sport 15008 lookup main",
        "9002: ipproto tcp lookup 15001",
    ]
    assert [r.describe() for r in routing.plan_routes(IPv4Address("10.244.1.2"))] == [
        "local 0.0.0.0/0 dev lo table 15001 src 10.244.1.2"
    ]


def test_include_ranges_limit_the_capture_rule():
    ex = CaptureExclusions.from_annotations({INCLUDE_OUTBOUND_IP_RANGES: "10.244.0.0/16,10.96.0.0/12"})
    capture = [r.describe() for r in routing.plan_rules(ex, ()) if r.priority == routing.PREF_CAPTURE]
    assert capture == [
        "9002: to 10.244.0.0/16 ipproto tcp lookup 15001",
        "9002: to 10.96.0.0/12 ipproto tcp lookup 15001",
    ]


def test_routing_diff_changes_only_what_differs():
    want = routing.plan_rules(CaptureExclusions.from_annotations({EXCLUDE_OUTBOUND_PORTS: "1"}), ())
    have = routing.plan_rules(CaptureExclusions.from_annotations({EXCLUDE_OUTBOUND_PORTS: "2"}), ())
    routes = routing.plan_routes(IPv4Address("10.0.0.5"))
    d = routing.diff(want, have, routes, routes)
    assert [r.dport for r in d.add_rules] == [(1, 1)]
    assert [r.dport for r in d.del_rules] == [(2, 2)]
    assert not d.add_routes and not d.del_routes
    assert routing.diff(want, want, routes, routes).empty


def test_sysctl_plan_makes_strict_rp_filter_loose_and_nothing_else():
    assert routing.plan_sysctls({"eth0/accept_local": 0, "eth0/rp_filter": 0, "all/rp_filter": 0}, "eth0") == {
        "eth0/accept_local": 1
    }
    assert routing.plan_sysctls({"eth0/accept_local": 1, "eth0/rp_filter": 1, "all/rp_filter": 1}, "eth0") == {
        "eth0/rp_filter": 2,
        "all/rp_filter": 2,
    }
    assert routing.plan_sysctls({"eth0/accept_local": 1, "eth0/rp_filter": 2, "all/rp_filter": 0}, "eth0") == {}


# --- nftables plan --------------------------------------------------------------------------


def test_nft_table_mirrors_the_ebpf_semantics():
    ex = CaptureExclusions.from_annotations(
        {EXCLUDE_INBOUND_PORTS: "9090", EXCLUDE_OUTBOUND_PORTS: "5432", EXCLUDE_OUTBOUND_IP_RANGES: "10.9.0.0/16"}
    )
    plan = nftables.render(IPv4Address("10.244.1.2"), (IPv4Network("10.244.1.1/32"),), ex)
    t = plan.text
    assert t.startswith("table ip nodemesh {") and f'comment "nodemesh {plan.digest}"' in t
    assert "elements = { 9090 }" in t and "elements = { 5432 }" in t and "elements = { 10.9.0.0/16 }" in t
    assert "meta mark & 0xfff == 0x539 accept" in t
    assert "ip daddr != 10.244.1.2 accept" in t and "tcp dport 15008 accept" in t
    assert t.index("tcp dport @in_excluded_ports accept") < t.index("redirect to :15006")
    assert t.index('oifname "lo" accept') < t.index("redirect to :15001")
    # The digest is a function of the content: same input, same table; other input, other digest.
    assert nftables.render(IPv4Address("10.244.1.2"), (IPv4Network("10.244.1.1/32"),), ex).digest == plan.digest
    assert nftables.render(IPv4Address("10.244.1.3"), (), ex).digest != plan.digest
    assert nftables.installed_digest(t) == plan.digest


# --- input validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"ip": "10.1.1"}, "is not an IPv4 address"),
        ({"ip": "127.0.0.1"}, "cannot be a pod address"),
        ({"uid": "bad uid with spaces"}, "is not a valid uid"),
        ({"netns": -1}, "netns fd -1 is invalid"),
        ({"eth0": "eth0; rm -rf"}, "is not an interface name"),
        ({"node_addresses": ("10.0.0.0/40",)}, "node_addresses"),
    ],
)
def test_pod_info_rejects_bad_input_naming_the_field(kwargs, needle):
    base = {"uid": "default/p", "netns": "/run/netns/x", "ip": "10.1.1.1"}
    with pytest.raises(RedirectError) as ei:
        PodNetInfo(**{**base, **kwargs})
    assert needle in str(ei.value)


def test_unknown_backend_is_refused():
    with pytest.raises(RedirectError, match="choose one of auto, ebpf, nftables"):
        RedirectController(backend="iptables")


@pytest.mark.parametrize(
    ("err", "needle"),
    [
        (errno.EPERM, "not permitted to load eBPF programs"),
        (errno.EINVAL, "does not support sk_lookup programs"),
        (errno.ENOSYS, "no bpf() system call"),
    ],
)
def test_kernel_answers_become_one_named_cause(monkeypatch, err, needle):
    def refuse() -> None:
        raise BpfError(err, "PROG_LOAD")

    monkeypatch.setattr(ebpf.sysbpf, "probe_sk_lookup", refuse)
    with pytest.raises(RedirectUnavailable) as ei:
        ebpf.preflight()
    assert ei.value.backend == "ebpf" and needle in ei.value.cause
    assert "\n" not in str(ei.value)


def test_missing_headers_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(ebpf.sysbpf, "probe_sk_lookup", lambda: None)
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path / "nowhere"))
    with pytest.raises(RedirectUnavailable) as ei:
        ebpf.preflight()
    assert "kernel headers" in ei.value.cause and "missing" in ei.value.cause


def test_auto_backend_falls_back_with_the_cause(monkeypatch, caplog):
    def unavailable(self):
        raise RedirectUnavailable("ebpf", "the kernel does not support sk_lookup programs (needs Linux 5.9 or newer)")

    monkeypatch.setattr(RedirectController, "_load_ebpf", unavailable)
    ctl = RedirectController(backend="auto")
    with caplog.at_level("WARNING", logger="nodemesh.redirect"):
        assert ctl.backend == "nftables"
    assert "sk_lookup" in ctl.fallback_reason
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "falling back to the nftables backend" in msgs[0] and "sk_lookup" in msgs[0]
    explicit = RedirectController(backend="ebpf")
    monkeypatch.setattr(RedirectController, "_load_ebpf", unavailable)
    with pytest.raises(RedirectUnavailable, match="ebpf redirection unavailable: the kernel does not support"):
        _ = explicit.backend


# --- original destination and netns helpers (own namespace: no privileges needed) -----------


def test_original_destination_is_the_local_address_for_direct_connections():
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        cli = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        assert original_destination(conn) == srv.getsockname()
        cli.close()
        conn.close()
    finally:
        srv.close()


def test_netns_helpers_on_the_current_namespace():
    me = "/proc/self/ns/net"
    assert run_in_netns(me, lambda x: x * 2, 21) == 42
    with pytest.raises(ZeroDivisionError):
        run_in_netns(me, lambda: 1 / 0)
    assert netns_cookie(me) > 0
    with NetnsWorker(me) as w:
        s = w.socket()
        s.close()
        assert w.run(os.getpid) == os.getpid()


def test_netns_errors_name_the_namespace(tmp_path):
    with pytest.raises(NetnsError, match="nm-does-not-exist"):
        open_netns("nm-does-not-exist")
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(NetnsError, match="is not a network namespace"):
        open_netns(str(plain))
