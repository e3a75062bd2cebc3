"""Routing as a user sees it: which backend a request reaches, how it is rewritten, what comes back
locally. Tables are built from the same YAML a user applies, through the config store."""

from __future__ import annotations

import random

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.config import ConfigStore
from waypoint.config.model import ServiceRef
from waypoint.flags import ResponseFlag
from waypoint.routing import (
    Headers,
    RequestView,
    RouteDecision,
    normalize_path,
    route,
)

SVC = ServiceRef("default", "reviews")


def table_from(yaml_text: str, service: ServiceRef = SVC):
    store = ConfigStore()
    for result in store.apply_all(yaml.safe_load_all(yaml_text)):
        assert result.accepted, result.message
    return store.snapshot().route_table(service)


def http_route(rules: str, parent_port: str = "") -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r1, namespace: default}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews{parent_port}}}]
  rules:
{rules}
"""


def req(path: str = "/", method: str = "GET", headers=None, port: int = 9080, **kw) -> RequestView:
    return RequestView(method, path, kw.pop("authority", "reviews:9080"), headers=Headers(headers or {}),
                       destination_port=port, **kw)


def backend_of(result) -> str:
    assert isinstance(result, RouteDecision), result
    return result.backend.name


def two_rules(match_a: str, match_b: str = "") -> str:
    second = f"""  - matches: [{match_b}]
    backendRefs: [{{name: b, port: 80}}]""" if match_b else ""
    return f"""  - matches: [{match_a}]
    backendRefs: [{{name: a, port: 80}}]
{second}"""


# --- path matching -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path_match", "path", "hit"),
    [
        ("{type: Exact, value: /abc}", "/abc", True),
        ("{type: Exact, value: /abc}", "/abc/", False),
        ("{type: Exact, value: /abc}", "/Abc", False),
        ("{type: Exact, value: /abc}", "/abcd", False),
        ("{type: Exact, value: /abc}", "/abc?x=1", True),
        ("{type: PathPrefix, value: /abc}", "/abc", True),
        ("{type: PathPrefix, value: /abc}", "/abc/", True),
        ("{type: PathPrefix, value: /abc}", "/abc/def", True),
        ("{type: PathPrefix, value: /abc}", "/abcd", False),
        ("{type: PathPrefix, value: /abc}", "/ABC", False),
        ("{type: PathPrefix, value: /abc/}", "/abc", True),
        ("{type: PathPrefix, value: /abc/}", "/abc/x", True),
        ("{type: PathPrefix, value: /}", "/anything/at/all", True),
        ("{type: RegularExpression, value: '/v[0-9]+/.*'}", "/v12/items", True),
        ("{type: RegularExpression, value: '/v[0-9]+'}", "/v12/items", False),  # full match, not search
        ("{type: RegularExpression, value: '/v[0-9]+'}", "/v12?x", True),  # the query is not part of the path
    ],
)
def test_path_match_types(path_match, path, hit):
    table = table_from(http_route(two_rules(f"{{path: {path_match}}}")))
    result = route(req(path), table)
    if hit:
        assert backend_of(result) == "a"
    else:
        assert result.status == 404 and ResponseFlag.NO_ROUTE_FOUND in result.flags


def test_matches_without_path_default_to_prefix_slash_and_rules_without_matches_catch_all():
    table = table_from(http_route("""  - matches: [{method: POST}]
    backendRefs: [{name: a, port: 80}]
  - backendRefs: [{name: b, port: 80}]"""))
    assert backend_of(route(req("/x/y", "POST"), table)) == "a"
    assert backend_of(route(req("/x/y", "GET"), table)) == "b"


def test_header_match_names_are_case_insensitive_and_values_exact():
    table = table_from(http_route(two_rules("{headers: [{name: X-User, value: alice}]}")))
    assert backend_of(route(req(headers={"x-user": "alice"}), table)) == "a"
    assert route(req(headers={"X-USER": "Alice"}), table).status == 404
    assert route(req(), table).status == 404


def test_repeated_request_header_is_matched_as_comma_joined_value():
    table = table_from(http_route(two_rules("{headers: [{name: x-v, type: RegularExpression, value: 'a,b'}]}")))
    assert backend_of(route(req(headers=Headers([("x-v", "a"), ("x-v", "b")])), table)) == "a"


def test_only_first_entry_of_a_repeated_header_name_counts():
    table = table_from(http_route(two_rules("{headers: [{name: x-a, value: '1'}, {name: X-A, value: '2'}]}")))
    assert backend_of(route(req(headers={"x-a": "1"}), table)) == "a"


def test_query_param_exact_and_regex_first_value_decoded():
    table = table_from(http_route(two_rules(
        "{queryParams: [{name: v, value: 'a b'}, {name: n, type: RegularExpression, value: '[0-9]+'}]}")))
    assert backend_of(route(req("/?v=a%20b&n=42"), table)) == "a"
    assert route(req("/?v=a%20b&n=x"), table).status == 404
    assert route(req("/?V=a%20b&n=1"), table).status == 404  # names are case-sensitive
    assert route(req("/?n=1&v=zzz&v=a%20b"), table).status == 404  # only the first value counts


def test_fields_in_a_match_are_anded_and_matches_are_ored():
    table = table_from(http_route(two_rules(
        "{path: {type: Exact, value: /a}, method: PUT}, {headers: [{name: x-b, value: '1'}]}")))
    assert backend_of(route(req("/a", "PUT"), table)) == "a"
    assert route(req("/a", "GET"), table).status == 404
    assert backend_of(route(req("/zzz", "GET", {"x-b": "1"}), table)) == "a"


# --- attachment -----------------------------------------------------------------------------------


def test_no_route_attached_goes_to_the_service_itself_with_istio_default_retries():
    table = table_from("", ServiceRef("default", "ratings"))
    result = route(req("/x"), table)
    assert isinstance(result, RouteDecision)
    assert result.backend.host == "ratings.default.svc.cluster.local"
    assert result.backend.port == 9080
    assert result.retry is not None and result.retry.num_retries == 2
    assert result.timeout is None


def test_route_attached_to_one_port_leaves_other_ports_on_default_routing():
    table = table_from(http_route(two_rules("{path: {type: Exact, value: /only}}"), parent_port=", port: 9080"))
    assert route(req("/other", port=9080), table).status == 404
    result = route(req("/other", port=8080), table)
    assert isinstance(result, RouteDecision) and result.route_name == "default"


def test_consumer_route_applies_only_to_clients_in_its_namespace_and_first():
    text = http_route(two_rules("{path: {type: PathPrefix, value: /}}")) + """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mine, namespace: frontend}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, namespace: default}]
  rules:
  - backendRefs: [{name: reviews-canary, namespace: default, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: allow-frontend, namespace: default}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: frontend}]
  to: [{group: "", kind: Service}]
"""
    table = table_from(text)
    frontend = req("/x", source_principal="spiffe://cluster.local/ns/frontend/sa/web")
    other = req("/x", source_principal="cluster.local/ns/batch/sa/job")
    assert backend_of(route(frontend, table)) == "reviews-canary"
    assert backend_of(route(other, table)) == "a"


def test_cross_namespace_backend_without_reference_grant_gets_500():
    table = table_from(http_route("""  - backendRefs: [{name: elsewhere, namespace: other, port: 80}]"""))
    result = route(req("/"), table)
    assert result.status == 500
    assert ResponseFlag.NO_CLUSTER_FOUND in result.flags


def test_rule_without_backend_refs_goes_to_the_parent_service():
    table = table_from(http_route("""  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 2s}"""))
    result = route(req("/slow/x"), table)
    assert isinstance(result, RouteDecision)
    assert result.backend.host == "reviews.default.svc.cluster.local"
    assert result.timeout == 2.0


# --- weights --------------------------------------------------------------------------------------


def test_weighted_80_20_split_over_1000_requests_is_within_statistical_bounds():
    table = table_from(http_route("""  - backendRefs:
    - {name: v1, port: 80, weight: 80}
    - {name: v2, port: 80, weight: 20}"""))
    rng = random.Random(20240601)
    counts = {"v1": 0, "v2": 0}
    for _ in range(1000):
        counts[backend_of(route(req(), table, rng=rng))] += 1
    # Binomial(1000, 0.2): sd ~ 12.6, so +-4 sd is 150..250.
    assert 150 <= counts["v2"] <= 250, counts
    assert counts["v1"] + counts["v2"] == 1000


def test_weight_zero_backend_never_receives_traffic_and_all_zero_gives_500():
    table = table_from(http_route("""  - backendRefs:
    - {name: v1, port: 80, weight: 1}
    - {name: v2, port: 80, weight: 0}"""))
    rng = random.Random(3)
    assert {backend_of(route(req(), table, rng=rng)) for _ in range(200)} == {"v1"}
    zero = table_from(http_route("""  - backendRefs: [{name: v1, port: 80, weight: 0}]"""))
    assert route(req(), zero).status == 500


# --- filters --------------------------------------------------------------------------------------


def test_request_and_response_header_modifiers():
    table = table_from(http_route("""  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Set, value: one}]
        add: [{name: X-Add, value: bar}]
        remove: [x-drop]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: x-served-by, value: waypoint}]
        remove: [server]
    backendRefs: [{name: a, port: 80}]"""))
    original = req(headers=Headers([("x-set", "old"), ("x-set", "older"), ("x-add", "foo"), ("x-drop", "1")]))
    result = route(original, table)
    up = result.upstream.headers
    assert up.get_all("x-set") == ["one"]
    assert up.joined("x-add") == "foo,bar"
    assert "x-drop" not in up
    resp = result.response(Headers([("server", "app"), ("content-type", "text/plain")]))
    assert resp.items() == [("content-type", "text/plain"), ("x-served-by", "waypoint")]
    # The request the shell handed in is untouched: routing is pure.
    assert original.headers.get_all("x-set") == ["old", "older"] and "x-drop" in original.headers


@pytest.mark.parametrize(
    ("redirect", "path", "location", "status"),
    [
        ("{scheme: https}", "/a?x=1", "https://reviews/a?x=1", 302),
        ("{scheme: https, port: 8443, statusCode: 301}", "/a", "https://reviews:8443/a", 301),
        ("{hostname: example.com}", "/a", "http://example.com:9080/a", 302),
        ("{hostname: example.com, port: 80}", "/a", "http://example.com/a", 302),
        ("{path: {type: ReplaceFullPath, replaceFullPath: /new}}", "/api/x?q", "http://reviews:9080/new?q", 302),
        ("{path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}", "/api/x", "http://reviews:9080/v2/x", 302),
    ],
)
def test_request_redirect_location(redirect, path, location, status):
    table = table_from(http_route(f"""  - matches:
    - {{path: {{type: PathPrefix, value: /api}}}}
    - {{path: {{type: PathPrefix, value: /a}}}}
    filters: [{{type: RequestRedirect, requestRedirect: {redirect}}}]"""))
    result = route(req(path), table)
    assert result.status == status
    assert dict(result.headers)["location"] == location


@pytest.mark.parametrize(
    ("prefix", "replacement", "path", "rewritten"),
    [
        ("/foo", "/bar", "/foo/baz", "/bar/baz"),
        ("/foo", "/bar", "/foo", "/bar"),
        ("/foo", "/bar", "/foo/", "/bar/"),
        ("/foo/", "/bar/", "/foo/baz", "/bar/baz"),
        ("/foo", "/", "/foo/baz", "/baz"),
        ("/foo", "/", "/foo", "/"),
        ("/foo", "/", "/foo/", "/"),
    ],
)
def test_url_rewrite_replace_prefix_match_is_element_wise(prefix, replacement, path, rewritten):
    table = table_from(http_route(f"""  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    filters:
    - type: URLRewrite
      urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: '{replacement}'}}}}
    backendRefs: [{{name: a, port: 80}}]"""))
    result = route(req(path + "?k=v"), table)
    assert result.upstream.path == rewritten + "?k=v"
    assert result.upstream.headers.get("x-envoy-original-path") == path + "?k=v"


def test_url_rewrite_full_path_and_hostname():
    table = table_from(http_route("""  - filters:
    - type: URLRewrite
      urlRewrite: {hostname: internal.example, path: {type: ReplaceFullPath, replaceFullPath: /status}}
    backendRefs: [{name: a, port: 80}]"""))
    result = route(req("/anything/here"), table)
    assert result.upstream.path == "/status"
    assert result.upstream.authority == "internal.example"


def test_request_mirror_percentage_is_sampled_per_request():
    table = table_from(http_route("""  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}, percent: 25}
    - type: RequestMirror
      requestMirror: {backendRef: {name: always, port: 80}}
    backendRefs: [{name: a, port: 80}]"""))
    rng = random.Random(7)
    mirrored = 0
    for _ in range(1000):
        names = [b.name for b in route(req(), table, rng=rng).mirrors]
        assert "always" in names
        mirrored += "shadow" in names
    assert 190 <= mirrored <= 310


# --- VirtualService -------------------------------------------------------------------------------


VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {prefix: /API}, ignoreUriCase: true}]
    rewrite: {uri: /v1}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{withoutHeaders: {x-debug: {}}, uri: {exact: /health}}]
    directResponse: {status: 200, body: {string: ok}}
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v3}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def test_virtual_service_first_match_wins_in_order():
    table = table_from(VS)
    r1 = route(req("/api/x", headers={"end-user": "jason"}), table)
    assert r1.backend.subset == "v2"
    r2 = route(req("/Api/items?z=1"), table)
    assert r2.backend.subset == "v1" and r2.upstream.path == "/v1/items?z=1"
    health = route(req("/health"), table)
    assert health.status == 200 and health.body == b"ok"
    # withoutHeaders takes the direct response out of play: the catch-all route answers instead. It sends
    # 10% to subset v3, which the DestinationRule does not define (503 NC), so both outcomes are the catch-all.
    for _ in range(50):
        fallthrough = route(req("/health", headers={"x-debug": "1"}), table)
        assert isinstance(fallthrough, RouteDecision) or fallthrough.details == "cluster_not_found"


def test_virtual_service_redirect_keeps_the_host_port_and_defaults_to_301():
    table = table_from("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: example.com}
  - redirect: {scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}
""")
    moved = route(req("/old/x?q=1", authority="reviews"), table)
    assert moved.status == 301 and dict(moved.headers)["location"] == "http://example.com/new?q=1"
    secure = route(req("/any", authority="reviews:8080"), table)
    assert dict(secure.headers)["location"] == "https://reviews/any"


def test_virtual_service_unknown_subset_gets_503_nc():
    table = table_from(VS)
    rng = random.Random(11)
    outcomes = [route(req("/other"), table, rng=rng) for _ in range(400)]
    nc = [o for o in outcomes if not isinstance(o, RouteDecision)]
    assert all(o.status == 503 and ResponseFlag.NO_CLUSTER_FOUND in o.flags for o in nc)
    assert 10 <= len(nc) <= 80  # subset v3 has no DestinationRule entry and 10% weight


# --- request view ---------------------------------------------------------------------------------


def test_headers_are_case_insensitive_and_multi_valued():
    h = Headers([("Accept", "a"), ("accept", "b"), ("X-One", "1")])
    assert h.get("ACCEPT") == "a" and h.get_all("accept") == ["a", "b"] and h.joined("accept") == "a,b"
    h.set("accept", "c")
    assert h.get_all("accept") == ["c"] and h.items()[0] == ("accept", "c")
    h.remove("x-one")
    assert "x-one" not in h


def test_request_view_from_h2_header_list_and_identity():
    view = RequestView.from_header_list(
        [(b":method", b"POST"), (b":path", b"/pkg.Svc/Call"), (b":authority", b"svc:50051"), (b":scheme", b"http"),
         (b"content-type", b"application/grpc")],
        source_principal="spiffe://cluster.local/ns/ns1/sa/app", destination_port=50051)
    assert view.method == "POST" and view.host == "svc" and view.authority_port == 50051
    assert view.is_grpc and view.source_namespace == "ns1" and view.source_principal == "cluster.local/ns/ns1/sa/app"


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [("/a/../admin", "/admin"), ("/a/./b/", "/a/b/"), ("/../../x?q=../y", "/x?q=../y"), ("/", "/"),
     ("/a/b/..", "/a/")],
)
def test_normalize_path_removes_dot_segments_and_keeps_the_query(raw, normalized):
    assert normalize_path(raw) == normalized


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.sampled_from(["GET", "POST", "DELETE", "get", ""]),
       st.lists(st.tuples(st.sampled_from(["end-user", "x-debug", "cookie", "X-A"]), st.text(max_size=10)),
                max_size=4))
def test_any_request_gets_a_decision_or_a_local_reply(path, method, headers):
    table = table_from(VS)
    result = route(RequestView(method, "/" + path, "reviews", headers=Headers(headers)), table,
                   rng=random.Random(0))
    assert isinstance(result, RouteDecision) or 200 <= result.status <= 599


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 1000), min_size=2, max_size=4))
def test_weighted_backend_frequencies_converge_for_any_weights(weights):
    refs = "\n".join(f"    - {{name: b{i}, port: 80, weight: {w}}}" for i, w in enumerate(weights))
    table = table_from(http_route(f"  - backendRefs:\n{refs}"))
    rng = random.Random(1)
    n = 2000
    counts = {f"b{i}": 0 for i in range(len(weights))}
    for _ in range(n):
        counts[backend_of(route(req(), table, rng=rng))] += 1
    total = sum(weights)
    for i, w in enumerate(weights):
        p = w / total
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(counts[f"b{i}"] - n * p) <= 5 * sd + 1, (weights, counts)
