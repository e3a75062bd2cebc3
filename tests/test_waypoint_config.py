"""Config from the YAML users apply: errors that name the resource and field, the last good version
staying in force, watch events, files, and how each resource kind translates."""

from __future__ import annotations

import random

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from waypoint.config import ConfigStore, Outcome
from waypoint.config.common import parse_gateway_duration, parse_istio_duration
from waypoint.config.files import apply_paths, sync_paths
from waypoint.config.model import ServiceRef, TableKind
from waypoint.lb import LbKind
from waypoint.resilience.retry import DEFAULT_RETRY_POLICY
from waypoint.routing import RequestView, RouteDecision, route

SVC = ServiceRef("default", "reviews")


def httproute(rules: str, name: str = "r1", namespace: str = "default") -> dict:
    return yaml.safe_load(f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews}}]
  rules:
{rules}
""")


def rejected(doc) -> str:
    result = ConfigStore().apply(doc)
    assert result.outcome is Outcome.REJECTED, result
    return result.message


# --- errors name the field ---------------------------------------------------------------------------


def test_error_names_resource_and_field_path():
    doc = httproute("""  - matches: [{path: {type: Exact, value: /a}}, {path: {type: Prefix, value: /b}}]""")
    assert rejected(doc) == ("HTTPRoute default/r1: spec.rules[0].matches[1].path.type: must be one of Exact, "
                             "PathPrefix, RegularExpression (got 'Prefix')")


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("  - backendRefs: [{name: a, port: 80, wieght: 3}]", "spec.rules[0].backendRefs[0].wieght: unknown field"),
        ("  - backendRefs: [{name: a, port: '80'}]", "spec.rules[0].backendRefs[0].port: must be an integer"),
        ("  - backendRefs: [{name: a}]", "spec.rules[0].backendRefs[0].port: required when referring to a Service"),
        ("  - backendRefs: [{name: a, port: 80, weight: -1}]", "spec.rules[0].backendRefs[0].weight"),
        ("  - matches: [{path: {value: abc}}]", "spec.rules[0].matches[0].path.value: must start with '/'"),
        ("  - matches: [{path: {value: /a//b}}]", "spec.rules[0].matches[0].path.value: must not contain '//'"),
        ("  - matches: [{path: {type: RegularExpression, value: '/(?=x)'}}]",
         "spec.rules[0].matches[0].path.value: invalid RE2 regular expression"),
        ("  - matches: [{method: FETCH}]", "spec.rules[0].matches[0].method: must be one of GET"),
        ("  - matches: [{headers: [{name: 'bad header', value: x}]}]",
         "spec.rules[0].matches[0].headers[0].name: 'bad header' is not a valid HTTP header name"),
        ("""  - filters:
    - {type: RequestRedirect, requestRedirect: {scheme: https}}
    - {type: URLRewrite, urlRewrite: {hostname: x}}""",
         "spec.rules[0].filters: RequestRedirect and URLRewrite cannot be combined in one rule"),
        ("""  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]""",
         "spec.rules[0].filters[0].requestRedirect.statusCode: must be one of 301, 302, 303, 307, 308"),
        ("""  - filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
    backendRefs: [{name: a, port: 80}]""", "a rule with a RequestRedirect must not have backendRefs"),
        ("""  - matches: [{path: {type: Exact, value: /a}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]
    backendRefs: [{name: a, port: 80}]""", "ReplacePrefixMatch needs every match of the rule to be a PathPrefix"),
        ("""  - filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: '1'}]}}
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: b, value: '1'}]}}""",
         "spec.rules[0].filters[1].type: RequestHeaderModifier may appear at most once per rule"),
        ("""  - filters: [{type: CORS, cors: {allowOrigins: ['*']}}]""",
         "spec.rules[0].filters[0].type: filter type CORS is not supported by this waypoint"),
        ("""  - sessionPersistence: {sessionName: s}""", "spec.rules[0].sessionPersistence: session persistence"),
        ("""  - timeouts: {request: 1s, backendRequest: 2s}""",
         "spec.rules[0].timeouts.backendRequest: must not be greater than timeouts.request"),
        ("""  - timeouts: {request: 1.5s}""", "spec.rules[0].timeouts.request: '1.5s' is not a Gateway API duration"),
        ("""  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}, percent: 10,
      fraction: {numerator: 1}}}]""", "set at most one of percent and fraction"),
    ],
)
def test_httproute_rejections(rules, message):
    text = rejected(httproute(rules))
    assert text.startswith("HTTPRoute default/r1: ")
    assert message in text


def test_not_a_mapping_missing_name_and_unsupported_version():
    store = ConfigStore()
    assert store.apply(["not", "a", "map"]).outcome is Outcome.REJECTED
    no_name = store.apply({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {}})
    assert "metadata.name: required field is missing" in no_name.message
    old = httproute("  - backendRefs: [{name: a, port: 80}]")
    old["apiVersion"] = "gateway.networking.k8s.io/v1alpha1"
    assert "apiVersion: gateway.networking.k8s.io/v1alpha1 is not supported" in store.apply(old).message


def test_other_kinds_are_ignored():
    result = ConfigStore().apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}})
    assert result.outcome is Outcome.IGNORED


# --- last good config ---------------------------------------------------------------------------


def first_backend(store: ConfigStore, path: str = "/") -> str:
    table = store.snapshot().route_table(SVC)
    result = route(RequestView("GET", path, "reviews"), table)
    return result.backend.name if isinstance(result, RouteDecision) else str(result.status)


def test_a_bad_update_keeps_the_last_good_version_in_force():
    store = ConfigStore()
    assert store.apply(httproute("  - backendRefs: [{name: v1, port: 80}]")).accepted
    bad = store.apply(httproute("  - backendRefs: [{name: v2, port: 80}]\n    matches: [{path: {type: Bogus}}]"))
    assert bad.outcome is Outcome.REJECTED and bad.kept_previous
    condition = bad.conditions()[0]
    assert (condition.type, condition.status, condition.reason) == ("Accepted", "False", "Invalid")
    assert "previously accepted version stays in force" in condition.message
    assert first_backend(store) == "v1"
    assert store.result("HTTPRoute", "default", "r1") is bad
    assert store.apply(httproute("  - backendRefs: [{name: v3, port: 80}]")).accepted
    assert first_backend(store) == "v3"


def test_snapshots_are_immutable_views():
    store = ConfigStore()
    store.apply(httproute("  - backendRefs: [{name: v1, port: 80}]"))
    before = store.snapshot()
    assert store.snapshot() is before
    store.apply(httproute("  - backendRefs: [{name: v2, port: 80}]"))
    after = store.snapshot()
    assert after is not before and after.version > before.version
    assert before.route_table(SVC).entries[0].action.backends[0].name == "v1"


def test_watch_events():
    store = ConfigStore()
    doc = httproute("  - backendRefs: [{name: v1, port: 80}]")
    assert store.on_event({"type": "ADDED", "object": doc}).accepted
    broken = httproute("  - backendRefs: [{name: v2}]")
    result = store.on_event({"type": "MODIFIED", "object": broken})
    assert result.outcome is Outcome.REJECTED and result.kept_previous
    assert first_backend(store) == "v1"
    assert store.on_event({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}) is None
    assert store.on_event({"type": "ERROR", "object": {"message": "too old"}}).outcome is Outcome.IGNORED
    assert store.on_event({"type": "DELETED", "object": doc}).outcome is Outcome.DELETED
    assert store.snapshot().route_table(SVC).kind is TableKind.DEFAULT


def test_kubectl_list_output_is_unwrapped():
    listing = {"apiVersion": "v1", "kind": "List",
               "items": [httproute("  - backendRefs: [{name: v1, port: 80}]", name=f"r{i}") for i in range(3)]}
    results = ConfigStore().apply_all([listing])
    assert [r.accepted for r in results] == [True, True, True]


def test_files_directory_sync_and_yaml_errors(tmp_path):
    (tmp_path / "a-route.yaml").write_text(yaml.safe_dump(httproute("  - backendRefs: [{name: v1, port: 80}]")))
    (tmp_path / "b-rest.yaml").write_text("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec: {host: reviews, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
""")
    store = ConfigStore()
    outcomes = sorted(r.outcome.value for r in sync_paths(store, [tmp_path]))
    assert outcomes == ["accepted", "accepted", "ignored"]
    assert first_backend(store) == "v1"
    # A syntax error is reported with the line; nothing is deleted on that sync.
    (tmp_path / "a-route.yaml").write_text("apiVersion: x\nkind: [unclosed\n")
    results = sync_paths(store, [tmp_path])
    errors = [r for r in results if r.outcome is Outcome.REJECTED]
    assert errors and "a-route.yaml: not valid YAML at line 3" in errors[0].message
    assert first_backend(store) == "v1"
    # Removing the file removes the route on the next clean sync.
    (tmp_path / "a-route.yaml").unlink()
    results = sync_paths(store, [tmp_path])
    assert any(r.outcome is Outcome.DELETED and r.ref.name == "r1" for r in results)
    assert store.snapshot().route_table(SVC).kind is TableKind.DEFAULT
    assert store.snapshot().cluster_policy("reviews.default.svc.cluster.local").lb.kind is LbKind.ROUND_ROBIN
    assert apply_paths(store, [tmp_path / "missing.yaml"])[0].outcome is Outcome.REJECTED


# --- HTTPRoute timeouts and retries (Istio's translation) ---------------------------------------


def action_of(rules: str):
    store = ConfigStore()
    result = store.apply(httproute(rules))
    assert result.accepted, result.message
    return store.snapshot().route_table(SVC).entries[0].action


def test_httproute_without_retry_gets_istio_default_and_backend_timeout_replaces_route_timeout():
    action = action_of("  - timeouts: {request: 10s, backendRequest: 2s}\n    backendRefs: [{name: a, port: 80}]")
    assert action.retry == DEFAULT_RETRY_POLICY and action.timeout == 2.0
    plain = action_of("  - timeouts: {request: 1m30s}\n    backendRefs: [{name: a, port: 80}]")
    assert plain.timeout == 90.0
    disabled = action_of("  - timeouts: {request: 0s}\n    backendRefs: [{name: a, port: 80}]")
    assert disabled.timeout is None


def test_httproute_retry_stanza():
    action = action_of("""  - timeouts: {request: 10s, backendRequest: 2s}
    retry: {codes: [503, 504], attempts: 3, backoff: 100ms}
    backendRefs: [{name: a, port: 80}]""")
    retry = action.retry
    assert retry.num_retries == 3 and retry.retriable_status_codes == {503, 504}
    assert retry.retry_on == {"connect-failure", "refused-stream", "unavailable", "cancelled",
                              "retriable-status-codes"}
    assert retry.per_try_timeout == 2.0 and retry.base_interval == 0.1 and action.timeout == 10.0
    assert action_of("  - retry: {}\n    backendRefs: [{name: a, port: 80}]").retry.num_retries == 2
    assert action_of("  - retry: {attempts: 0}\n    backendRefs: [{name: a, port: 80}]").retry is None


# --- GRPCRoute ------------------------------------------------------------------------------------


GRPC = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
  - matches: [{method: {service: pkg.Reviews, method: Get}}]
    backendRefs: [{name: exact, port: 50051}]
  - matches: [{method: {service: pkg.Reviews}}]
    backendRefs: [{name: service-only, port: 50051}]
  - matches: [{method: {method: Ping}}]
    backendRefs: [{name: method-only, port: 50051}]
  - matches: [{method: {type: RegularExpression, service: 'pkg\\..*'}, headers: [{name: x-env, value: dev}]}]
    backendRefs: [{name: regex, port: 50051}]
"""


@pytest.mark.parametrize(
    ("path", "headers", "backend"),
    [
        ("/pkg.Reviews/Get", {}, "exact"),
        ("/pkg.Reviews/List", {}, "service-only"),
        ("/other.Health/Ping", {}, "method-only"),
        ("/pkg.Other/Do", {"x-env": "dev"}, "regex"),
    ],
)
def test_grpcroute_method_matches(path, headers, backend):
    store = ConfigStore()
    assert store.apply(yaml.safe_load(GRPC)).accepted
    table = store.snapshot().route_table(SVC)
    request = RequestView("POST", path, "reviews:50051", headers={"content-type": "application/grpc", **headers})
    assert route(request, table).backend.name == backend


def test_grpcroute_method_match_needs_service_or_method():
    doc = yaml.safe_load(GRPC)
    doc["spec"]["rules"][0]["matches"][0]["method"] = {"type": "Exact"}
    assert "spec.rules[0].matches[0].method: at least one of service and method is required" in rejected(doc)


# --- VirtualService -------------------------------------------------------------------------------


def vs(http: str, extra: str = "") -> dict:
    return yaml.safe_load(f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
{extra}
  http:
{http}
""")


@pytest.mark.parametrize(
    ("http", "message"),
    [
        ("  - route: [{destination: {host: r}}]\n    retries: {attempts: 2, retryOn: 'gateway-eror'}",
         "spec.http[0].retries.retryOn: 'gateway-eror' is not a retry condition"),
        ("  - route: [{destination: {host: r}}]\n    timeout: 0s",
         "spec.http[0].timeout: duration '0s' must be at least 1ms"),
        ("  - route: [{destination: {host: r}}]\n    fault: {abort: {percentage: {value: 10}}}",
         "spec.http[0].fault.abort: set exactly one of httpStatus and grpcStatus"),
        ("  - route: [{destination: {host: r}}]\n    fault: {abort: {grpcStatus: NOPE, percentage: {value: 1}}}",
         "spec.http[0].fault.abort.grpcStatus: must be one of OK"),
        ("  - route: [{destination: {host: r}}]\n    fault: {abort: {httpStatus: 503, percentage: {value: 120}}}",
         "spec.http[0].fault.abort.percentage.value"),
        ("  - delegate: {name: other}", "spec.http[0].delegate: delegate VirtualServices are not supported"),
        ("  - route: [{destination: {host: r}}]\n    redirect: {uri: /x}",
         "spec.http[0]: set exactly one of route, redirect and directResponse"),
        ("  - match: [{headers: {x-a: {exact: a, prefix: b}}}]\n    route: [{destination: {host: r}}]",
         'spec.http[0].match[0].headers["x-a"]: set only one of exact, prefix, regex'),
        ("  - match: [{headers: {x-a: {exakt: a}}}]\n    route: [{destination: {host: r}}]",
         'spec.http[0].match[0].headers["x-a"].exakt: unknown field'),
    ],
)
def test_virtualservice_rejections(http, message):
    text = rejected(vs(http))
    assert text.startswith("VirtualService default/reviews: ")
    assert message in text


def test_virtualservice_translation_details():
    store = ConfigStore()
    result = store.apply(vs("""  - match: [{sourceLabels: {app: x}, uri: {prefix: /a}}]
    timeout: 0.5s
    retries: {attempts: 3, perTryTimeout: 100ms, retryOn: '5xx,409'}
    fault: {delay: {fixedDelay: 2s, percent: 5}}
    mirror: {host: shadow.other.svc.cluster.local}
    mirrorPercentage: {value: 12.5}
    route: [{destination: {host: reviews, port: {number: 9080}}}]"""))
    assert result.accepted and any("sourceLabels" in w for w in result.warnings)
    action = store.snapshot().route_table(SVC).entries[0].action
    assert action.timeout == 0.5
    assert action.retry.num_retries == 3 and action.retry.per_try_timeout == 0.1
    assert action.retry.retriable_status_codes == {409} and "5xx" in action.retry.retry_on
    assert action.fault.delay.fixed_delay == 2.0 and action.fault.delay.percentage == 5.0
    assert action.mirrors[0].backend.host == "shadow.other.svc.cluster.local" and action.mirrors[0].percent == 12.5
    assert action.backends[0].host == "reviews.default.svc.cluster.local" and action.backends[0].port == 9080


def test_virtualservice_bound_only_to_gateways_does_not_apply():
    store = ConfigStore()
    result = store.apply(vs("  - route: [{destination: {host: other}}]", extra="  gateways: [istio-ingress]"))
    assert result.accepted and any("gateways" in w for w in result.warnings)
    assert store.snapshot().route_table(SVC).kind is TableKind.DEFAULT


def test_httproute_wins_over_virtualservice_for_the_same_service():
    store = ConfigStore()
    store.apply(vs("  - route: [{destination: {host: from-vs}}]"))
    store.apply(httproute("  - backendRefs: [{name: from-route, port: 80}]"))
    snap = store.snapshot()
    assert first_backend(store) == "from-route"
    assert SVC in snap.conflicts


def test_virtualservice_wildcard_host_and_waypoint_namespace_scope():
    store = ConfigStore()
    doc = vs("  - route: [{destination: {host: catch-all}}]")
    doc["spec"]["hosts"] = ["*.default.svc.cluster.local"]
    store.apply(doc)
    elsewhere = vs("  - route: [{destination: {host: nope}}]")
    elsewhere["metadata"]["namespace"] = "unrelated"
    elsewhere["metadata"]["name"] = "x"
    elsewhere["spec"]["hosts"] = ["ratings.default.svc.cluster.local"]
    store.apply(elsewhere)
    snap = store.snapshot()
    assert snap.route_table(SVC).entries[0].action.backends[0].name == "catch-all"
    ratings = snap.route_table(ServiceRef("default", "ratings"))
    assert ratings.entries[0].action.backends[0].name == "catch-all"


# --- DestinationRule ------------------------------------------------------------------------------


DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {http: {http2MaxRequests: 100}}
    outlierDetection: {consecutive5xxErrors: 7, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50}
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {consistentHash: {httpCookie: {name: user, ttl: 0s}}}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool: {http: {http2MaxRequests: 5, maxRetries: 1}}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 251}}}
"""


def test_destinationrule_levels_merge_field_by_field():
    host = "reviews.default.svc.cluster.local"
    store = ConfigStore()
    result = store.apply(yaml.safe_load(DR))
    assert result.accepted and any("tls" in w for w in result.warnings)
    snap = store.snapshot()
    top = snap.cluster_policy(host, 8080)
    assert top.lb.kind is LbKind.ROUND_ROBIN and top.thresholds.max_requests == 100
    assert top.outlier.consecutive_5xx == 7 and top.outlier.base_ejection_time == 60.0
    assert top.outlier.max_ejection_percent == 50.0 and top.outlier.interval == 5.0
    port = snap.cluster_policy(host, 9080)
    assert port.lb.kind is LbKind.RING_HASH and port.lb.hash_policy.cookie == "user"
    v2 = snap.cluster_policy(host, 8080, "v2")
    assert v2.thresholds.max_requests == 5 and v2.thresholds.max_retries == 1
    assert v2.lb.kind is LbKind.ROUND_ROBIN and v2.outlier.consecutive_5xx == 7
    assert v2.subset_labels == {"version": "v2"}
    v3 = snap.cluster_policy(host, 8080, "v3")
    assert v3.lb.kind is LbKind.MAGLEV and v3.lb.hash_policy.source_ip and v3.lb.maglev_table_size == 251
    assert snap.cluster_policy(host, 8080, "v9") is None
    assert snap.cluster_policy("unknown.default.svc.cluster.local").lb.kind is LbKind.LEAST_REQUEST


def test_destinationrule_rejections():
    tunnel = DR.replace("    tls: {mode: ISTIO_MUTUAL}", "    tunnel: {protocol: CONNECT, targetHost: x}")
    assert "spec.trafficPolicy.tunnel: tunnel settings are not supported" in rejected(yaml.safe_load(tunnel))
    maglev = DR.replace("tableSize: 251", "tableSize: 250")
    assert "spec.subsets[1].trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: must be a prime" in \
        rejected(yaml.safe_load(maglev))
    two_keys = DR.replace("useSourceIp: true", "useSourceIp: true, httpHeaderName: x-user")
    assert "set exactly one of httpHeaderName" in rejected(yaml.safe_load(two_keys))


def test_destinationrule_subset_unknown_to_dr_fails_requests_with_nc():
    store = ConfigStore()
    store.apply(yaml.safe_load(DR))
    store.apply(vs("  - route: [{destination: {host: reviews, subset: v7}}]"))
    result = route(RequestView("GET", "/", "reviews"), store.snapshot().route_table(SVC), rng=random.Random(0))
    assert result.status == 503


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("1h", 3600), ("1m30s", 90), ("500ms", 0.5), ("0s", 0)])
def test_gateway_durations(text, seconds):
    assert parse_gateway_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["1.5s", "1d", "s", "", "100000s"])
def test_bad_gateway_durations(text):
    with pytest.raises(ValueError):
        parse_gateway_duration(text)


@pytest.mark.parametrize(("text", "seconds"), [("1.5s", 1.5), ("100ms", 0.1), ("1m", 60), ("1h2m3s", 3723)])
def test_istio_durations(text, seconds):
    assert parse_istio_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["0s", "abc", "10", "1.5", 5])
def test_bad_istio_durations(text):
    with pytest.raises(ValueError):
        parse_istio_duration(text)


# --- robustness -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=False) |
    st.sampled_from(["", "/", "*", "Exact", "PathPrefix", "GET", "ALLOW", "DENY", "1s", "reviews", "a*b", "(?="]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["rules", "matches", "path", "type", "value", "backendRefs", "name", "port", "weight",
                         "filters", "http", "route", "destination", "host", "match", "uri", "exact", "to", "from",
                         "operation", "source", "paths", "targetRefs", "kind", "when", "key", "values",
                         "trafficPolicy", "loadBalancer", "simple", "subsets", "fault", "abort"]),
        children, max_size=4),
    max_leaves=20,
)
KINDS = [("gateway.networking.k8s.io/v1", "HTTPRoute"), ("gateway.networking.k8s.io/v1", "GRPCRoute"),
         ("networking.istio.io/v1", "VirtualService"), ("networking.istio.io/v1", "DestinationRule"),
         ("security.istio.io/v1", "AuthorizationPolicy"), ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant")]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KINDS), json_values)
def test_garbage_never_crashes_and_is_reported(kind, spec):
    api, k = kind
    store = ConfigStore()
    result = store.apply({"apiVersion": api, "kind": k, "metadata": {"name": "x", "namespace": "ns"}, "spec": spec})
    assert result.outcome in (Outcome.ACCEPTED, Outcome.REJECTED)
    if result.outcome is Outcome.REJECTED:
        assert result.message.startswith(f"{k} ns/x: ")
    snapshot = store.snapshot()
    snapshot.route_table(ServiceRef("ns", "reviews"))
    snapshot.authz_policies(ServiceRef("ns", "reviews"))
