"""Gateway API precedence across rules and routes: table tests for each of the spec's eight rules, and
property tests that the order is a strict total order consistent with them."""

from __future__ import annotations

import datetime as dt

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.config import ConfigStore
from waypoint.config.model import (
    HeaderMatch,
    MatchKind,
    PathKind,
    PathMatch,
    QueryMatch,
    RequestMatch,
    ResourceRef,
    ServiceRef,
    StringMatcher,
)
from waypoint.config.precedence import precedence_key
from waypoint.routing import Headers, RequestView, route

SVC = ServiceRef("default", "svc")


def route_doc(name: str, matches: str, backend: str, created: str = "2024-01-01T00:00:00Z",
              namespace: str = "default") -> str:
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {namespace}, creationTimestamp: "{created}"}}
spec:
  parentRefs: [{{group: "", kind: Service, name: svc, namespace: default}}]
  rules:
  - matches: [{matches}]
    backendRefs: [{{name: {backend}, namespace: default, port: 80}}]
---"""


def winner(docs: str, path: str, method: str = "GET", headers: dict | None = None) -> str:
    store = ConfigStore()
    for result in store.apply_all(yaml.safe_load_all(docs)):
        assert result.accepted, result.message
    table = store.snapshot().route_table(SVC)
    result = route(RequestView(method, path, "svc", headers=Headers(headers or {})), table)
    return result.backend.name


def test_rule_1_exact_path_beats_any_prefix():
    docs = route_doc("a", "{path: {type: PathPrefix, value: /very/long/prefix}}", "prefix") + \
        route_doc("b", "{path: {type: Exact, value: /very/long/prefix}}", "exact", created="2025-01-01T00:00:00Z")
    assert winner(docs, "/very/long/prefix") == "exact"


def test_rule_2_longest_prefix_wins():
    docs = route_doc("a", "{path: {type: PathPrefix, value: /a}}", "short") + \
        route_doc("b", "{path: {type: PathPrefix, value: /a/b}}", "long", created="2025-01-01T00:00:00Z")
    assert winner(docs, "/a/b/c") == "long"
    assert winner(docs, "/a/x") == "short"


def test_rule_3_method_match_beats_headers():
    two_headers = "{path: {type: PathPrefix, value: /}, headers: [{name: x, value: '1'}, {name: y, value: '2'}]}"
    docs = route_doc("a", two_headers, "headers") + \
        route_doc("b", "{path: {type: PathPrefix, value: /}, method: GET}", "method", created="2025-01-01T00:00:00Z")
    assert winner(docs, "/", "GET", {"x": "1", "y": "2"}) == "method"


def test_rule_4_more_header_matches_win():
    docs = route_doc("a", "{headers: [{name: x, value: '1'}]}", "one") + \
        route_doc("b", "{headers: [{name: x, value: '1'}, {name: y, value: '2'}]}", "two",
                  created="2025-01-01T00:00:00Z")
    assert winner(docs, "/", headers={"x": "1", "y": "2"}) == "two"


def test_rule_5_more_query_matches_win():
    docs = route_doc("a", "{queryParams: [{name: q, value: '1'}]}", "one") + \
        route_doc("b", "{queryParams: [{name: q, value: '1'}, {name: r, value: '2'}]}", "two",
                  created="2025-01-01T00:00:00Z")
    assert winner(docs, "/?q=1&r=2") == "two"


def test_rule_6_oldest_route_wins_a_tie():
    docs = route_doc("zzz-old", "{path: {type: PathPrefix, value: /x}}", "old", created="2020-01-01T00:00:00Z") + \
        route_doc("aaa-new", "{path: {type: PathPrefix, value: /x}}", "new", created="2024-01-01T00:00:00Z")
    assert winner(docs, "/x") == "old"


def test_rule_7_alphabetical_namespace_name_breaks_a_timestamp_tie():
    docs = route_doc("beta", "{path: {type: PathPrefix, value: /x}}", "beta") + \
        route_doc("alpha", "{path: {type: PathPrefix, value: /x}}", "alpha")
    assert winner(docs, "/x") == "alpha"


def test_rule_8_first_rule_in_list_order_wins():
    docs = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: svc}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /x}}]
    backendRefs: [{name: first, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /x}}]
    backendRefs: [{name: second, port: 80}]
"""
    assert winner(docs, "/x") == "first"


def test_regex_ranks_below_prefix_and_rules_without_matches_come_last():
    docs = route_doc("a", "{path: {type: RegularExpression, value: '/x/.*'}}", "regex") + \
        route_doc("b", "{path: {type: PathPrefix, value: /}}", "slash", created="2025-01-01T00:00:00Z")
    assert winner(docs, "/x/1") == "slash"


# --- properties --------------------------------------------------------------------------------------

paths = st.one_of(
    st.none(),
    st.builds(lambda v: PathMatch(PathKind.EXACT, v), st.sampled_from(["/", "/a", "/a/b", "/abc"])),
    st.builds(lambda v: PathMatch(PathKind.PATH_PREFIX, v), st.sampled_from(["/", "/a", "/a/", "/a/b", "/abc"])),
    st.builds(lambda v: PathMatch(PathKind.REGEX, v), st.sampled_from(["/.*", "/a.*"])),
)
matches = st.one_of(
    st.none(),
    st.builds(
        lambda p, m, h, q: RequestMatch(
            path=p, method=StringMatcher(MatchKind.EXACT, m) if m else None,
            headers=tuple(HeaderMatch(f"h{i}", StringMatcher(MatchKind.EXACT, "v")) for i in range(h)),
            query=tuple(QueryMatch(f"q{i}", StringMatcher(MatchKind.EXACT, "v")) for i in range(q))),
        paths, st.sampled_from([None, "GET"]), st.integers(0, 3), st.integers(0, 3)),
)
entries = st.tuples(
    matches,
    st.sampled_from([None, dt.datetime(2020, 1, 1, tzinfo=dt.UTC), dt.datetime(2024, 1, 1, tzinfo=dt.UTC)]),
    st.sampled_from(["a", "b", "c"]),
    st.integers(0, 3),
    st.integers(0, 3),
)


def key(e):
    match, created, name, rule, idx = e
    return precedence_key(match, created, ResourceRef("HTTPRoute", "default", name), rule, idx)


def identity(e):
    _, _, name, rule, idx = e
    return (name, rule, idx)


def spec_order(a, b) -> int | None:
    """-1 if a must come first by the spec's rules 1-5 on non-regex paths, 1 if b, None if undecided."""
    ma, mb = a[0], b[0]
    if ma is None or mb is None or ma.path is None or mb.path is None:
        return None
    if PathKind.REGEX in (ma.path.kind, mb.path.kind):
        return None
    ea, eb = ma.path.kind is PathKind.EXACT, mb.path.kind is PathKind.EXACT
    if ea != eb:
        return -1 if ea else 1
    if not ea and ma.path.prefix_length != mb.path.prefix_length:
        return -1 if ma.path.prefix_length > mb.path.prefix_length else 1
    if ea:
        return None
    if (ma.method is None) != (mb.method is None):
        return -1 if ma.method is not None else 1
    if len(ma.headers) != len(mb.headers):
        return -1 if len(ma.headers) > len(mb.headers) else 1
    if len(ma.query) != len(mb.query):
        return -1 if len(ma.query) > len(mb.query) else 1
    return None


@settings(max_examples=300, deadline=None)
@given(entries, entries)
def test_order_is_strict_total_and_consistent_with_the_spec(a, b):
    ka, kb = key(a), key(b)
    if identity(a) == identity(b):
        return  # the same (route, rule, match) is the same entry
    assert (ka < kb) != (kb < ka), "two distinct entries must be strictly ordered"
    expected = spec_order(a, b)
    if expected is not None:
        assert (ka < kb) == (expected == -1)


@settings(max_examples=150, deadline=None)
@given(entries, entries, entries)
def test_order_is_transitive(a, b, c):
    ka, kb, kc = key(a), key(b), key(c)
    if ka < kb and kb < kc:
        assert ka < kc
