"""The sans-IO request rules: header parsing and the 200/400 decision, including property-based checks."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hbone.errors import HeaderError
from mesh.hbone.headers import (
    Authority,
    TraceParent,
    format_baggage,
    format_forwarded,
    parse_authority,
    parse_baggage,
    parse_forwarded,
    parse_traceparent,
    workload_baggage,
)
from mesh.hbone.protocol import (
    ConnectRequest,
    Rejection,
    build_connect_headers,
    validate_connect,
    validate_response,
)

# ---- :authority ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "host", "port"), [
    ("10.244.1.5:8080", "10.244.1.5", 8080),
    ("[2001:db8::1]:443", "2001:db8::1", 443),
    ("127.0.0.1:1", "127.0.0.1", 1),
    ("1.2.3.4:65535", "1.2.3.4", 65535),
])
def test_authority_accepts_ip_and_port(text: str, host: str, port: int) -> None:
    a = parse_authority(text)
    assert (a.host, a.port, str(a.ip)) == (host, port, host)
    assert str(a) == text


@pytest.mark.parametrize(("text", "needle"), [
    ("", "empty"),
    ("10.0.0.1", "no port"),
    ("10.0.0.1:", "not a number"),
    ("10.0.0.1:0", "outside"),
    ("10.0.0.1:65536", "outside"),
    ("10.0.0.1:+80", "not a number"),
    ("10.0.0.1:80 ", "not a number"),
    ("2001:db8::1:80", "brackets"),
    ("[2001:db8::1:80", "ipv6"),
    ("[zz::1]:80", "IPv6"),
    ("svc.default:80", "not an IP"),
    ("1.2.3.4:8" + "0" * 300, "longer"),
    ("10.0.0.1:\uff18\uff10", "not a number"),
])
def test_authority_rejects_with_a_reason(text: str, needle: str) -> None:
    with pytest.raises(HeaderError) as exc:
        parse_authority(text)
    assert exc.value.header == ":authority"
    assert needle.lower() in str(exc.value).lower()


def test_hostname_authority_only_when_allowed() -> None:
    a = parse_authority("Reviews.Default.svc.cluster.local:9080", allow_hostname=True)
    assert (a.host, a.port, a.ip) == ("reviews.default.svc.cluster.local", 9080, None)
    with pytest.raises(HeaderError):
        parse_authority("bad_name!:80", allow_hostname=True)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_authority_round_trips(ip, port) -> None:
    a = Authority.from_address(ip, port)
    assert parse_authority(str(a)) == a


@given(st.text(max_size=300) | st.binary(max_size=300))
def test_authority_parser_only_raises_header_errors(value) -> None:
    try:
        a = parse_authority(value)
    except HeaderError:
        return
    assert 1 <= a.port <= 65535 and a.ip is not None


# ---- forwarded, traceparent, baggage --------------------------------------------------------------------


def test_forwarded_as_ztunnel_sends_it() -> None:
    f = parse_forwarded('for="10.244.0.7:54321"')
    assert (str(f.for_ip), f.for_port, f.host) == ("10.244.0.7", 54321, None)
    f = parse_forwarded('for="[2001:db8::7]:443";host=reviews.default.svc.cluster.local, for=10.0.0.1')
    assert (str(f.for_ip), f.for_port, f.host) == ("2001:db8::7", 443, "reviews.default.svc.cluster.local")
    assert format_forwarded("10.244.0.7", 54321) == 'for="10.244.0.7:54321"'
    assert format_forwarded("2001:db8::7", 1, "x.svc") == 'for="[2001:db8::7]:1";host=x.svc'
    assert parse_forwarded("for=unknown").for_ip is None


@pytest.mark.parametrize("bad", ['for="10.0.0.1:99999"', "for", "for=10.0.0.1;for=10.0.0.2", 'for="[::1"',
                                 "for=not-an-ip", "=x", 'host="a b"'])
def test_forwarded_rejects_malformed(bad: str) -> None:
    with pytest.raises(HeaderError):
        parse_forwarded(bad)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_forwarded_round_trips(ip, port) -> None:
    f = parse_forwarded(format_forwarded(ip, port))
    assert (f.for_ip, f.for_port) == (ipaddress.ip_address(ip), port)


def test_traceparent_w3c_rules() -> None:
    tp = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert (tp.trace_id, tp.parent_id, tp.flags) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "01")
    for bad in ("00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
                "garbage"):
        with pytest.raises(HeaderError):
            parse_traceparent(bad)
    # a future version may append fields
    assert parse_traceparent("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more").version == "01"
    child = tp.child()
    assert child.trace_id == tp.trace_id and child.parent_id != tp.parent_id


@settings(max_examples=50)
@given(st.integers(0, 10**6))
def test_generated_traceparents_parse(_) -> None:
    tp = TraceParent.generate()
    assert parse_traceparent(str(tp)) == tp


def test_baggage_members_and_encoding() -> None:
    bag = workload_baggage(cluster="Kubernetes", namespace="default", workload="sleep", workload_type="deployment",
                           service="sleep", revision="v1", region="eu west")
    text = str(bag)
    assert "k8s.deployment.name=sleep" in text and "cloud.region=eu%20west" in text
    assert parse_baggage(text).members == bag.members
    assert parse_baggage("a=1;prop=x, b = 2").members == {"a": "1", "b": "2"}
    for bad in ("a", "=1", "a=b c", "a=" + "x" * 9000):
        with pytest.raises(HeaderError):
            parse_baggage(bad)
    with pytest.raises(HeaderError):
        workload_baggage(workload="x", workload_type="statefulset")


@given(st.dictionaries(st.from_regex(r"\A[a-z][a-z0-9._-]{0,20}\Z"), st.text(max_size=30), max_size=10))
def test_baggage_round_trips_any_text(members) -> None:
    assert parse_baggage(format_baggage(members)).members == members


# ---- the CONNECT decision ----------------------------------------------------------------------------


def req(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def test_ztunnel_style_request_is_accepted() -> None:
    headers = build_connect_headers("10.244.1.5:8080", forwarded='for="10.244.0.7:40000"',
                                    baggage=workload_baggage(namespace="default", workload="sleep"),
                                    traceparent=TraceParent.generate())
    verdict = validate_connect(headers)
    assert isinstance(verdict, ConnectRequest)
    assert str(verdict.authority) == "10.244.1.5:8080"
    assert verdict.forwarded.for_port == 40000
    assert verdict.baggage.get("k8s.deployment.name") == "sleep"
    assert verdict.traceparent_received


@pytest.mark.parametrize(("headers", "reason"), [
    (req((":method", "GET"), (":authority", "1.2.3.4:80"), (":scheme", "https"), (":path", "/")), "method"),
    (req((":authority", "1.2.3.4:80")), "no_method"),
    (req((":method", "CONNECT")), "no_authority"),
    (req((":method", "CONNECT"), (":authority", "1.2.3.4")), "bad_authority"),
    (req((":method", "CONNECT"), (":authority", "1.2.3.4:80"), (":protocol", "websocket")), "extended_connect"),
    (req((":method", "CONNECT"), (":authority", "1.2.3.4:80"), (":path", "/")), "malformed_headers"),
    (req((":method", "CONNECT"), (":authority", "1.2.3.4:80"), (":status", "200")), "malformed_headers"),
    (req((":method", "CONNECT"), ("x", "1"), (":authority", "1.2.3.4:80")), "malformed_headers"),
    (req((":method", "CONNECT"), (":authority", "1.2.3.4:80"), ("Upper", "1")), "malformed_headers"),
    (req((":method", "CONNECT"), (":authority", "1.2.3.4:80"), ("x", "a\r\nb")), "malformed_headers"),
    (req((":method", "CONNECT"), (":authority", "1.2.3.4:80"), ("x", " padded")), "malformed_headers"),
    (req((":method", "CONNECT"), (":authority", "1.2.3.4:80"), ("transfer-encoding", "chunked")),
     "malformed_headers"),
    (req((":method", "CONNECT"), (":authority", "1.2.3.4:80"), ("te", "gzip")), "malformed_headers"),
    (req((":method", "CONNECT"), (":authority", "1.2.3.4:80"), ("host", "5.6.7.8:80")), "malformed_headers"),
    (req((":method", "CONNECT"), (":method", "CONNECT"), (":authority", "1.2.3.4:80")), "malformed_headers"),
])
def test_bad_requests_are_400_with_a_reason(headers, reason) -> None:
    verdict = validate_connect(headers)
    assert isinstance(verdict, Rejection)
    assert (verdict.status, verdict.reason) == (400, reason)
    assert verdict.message


def test_bad_informational_headers_degrade_to_absent() -> None:
    verdict = validate_connect(req((":method", "CONNECT"), (":authority", "1.2.3.4:80"), ("forwarded", "for=nope"),
                                   ("baggage", "no equals"), ("traceparent", "zz")))
    assert isinstance(verdict, ConnectRequest)
    assert verdict.forwarded is None and verdict.forwarded_raw == "for=nope"
    assert verdict.baggage is None
    assert not verdict.traceparent_received  # a fresh one was generated instead
    parse_traceparent(str(verdict.traceparent))


_names = st.sampled_from([b":method", b":authority", b":path", b":scheme", b":status", b"forwarded",
                          b"baggage", b"traceparent", b"host", b"connection", b"te", b"x-a"]) | st.binary(max_size=12)


@settings(max_examples=300)
@given(st.lists(st.tuples(_names, st.binary(max_size=40)), max_size=8))
def test_any_header_list_gets_a_decision_never_an_exception(headers) -> None:
    verdict = validate_connect(headers)
    assert isinstance(verdict, ConnectRequest | Rejection)
    if isinstance(verdict, ConnectRequest):
        methods = [v for n, v in headers if n == b":method"]
        assert methods == [b"CONNECT"]
        assert verdict.authority.ip is not None


def test_response_validation() -> None:
    assert validate_response([(b":status", b"200"), (b"baggage", b"a=b")]).status == 200
    for bad in ([], [(b":status", b"2000")], [(b":status", b"abc")], [(b":method", b"GET"), (b":status", b"200")],
                [(b"x", b"1"), (b":status", b"200")]):
        with pytest.raises(HeaderError):
            validate_response(bad)
