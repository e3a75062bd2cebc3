"""Istio AuthorizationPolicy YAML -> L4 Authorization, as istiod converts it for ztunnel.

Besides the structure of the result, the tests check what a user notices: which connections the
translated policy lets through.
"""

from __future__ import annotations

import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.authz import ConnInfo, evaluate, policy_matches
from mesh.config import ConfigError, parse_policy_documents, translate_policy
from mesh.config.istio import has_effective_rules, parse_any_policy, parse_policy_file
from mesh.config.model import Action, Scope, ServiceAccountMatch

SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
OTHER = "spiffe://cluster.local/ns/foo/sa/other"


def ap(spec: dict | None = None, *, name: str = "p", namespace: str | None = "default", annotations=None) -> dict:
    meta: dict = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = annotations
    obj = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta}
    if spec is not None:
        obj["spec"] = spec
    return obj


def conn(identity=None, port=8080, src="10.0.0.5", dst="10.0.1.9") -> ConnInfo:
    return ConnInfo(src_ip=src, dst_ip=dst, dst_port=port, src_identity=identity)


# --- scope ------------------------------------------------------------------------------------------


def test_selector_policy_keeps_its_labels():
    tp = translate_policy(ap({"selector": {"matchLabels": {"app": "httpbin"}}, "rules": [{}]}))
    assert tp.authorization.scope is Scope.WORKLOAD_SELECTOR
    assert dict(tp.authorization.selector) == {"app": "httpbin"}


def test_no_selector_is_namespace_scope_and_root_namespace_is_global():
    assert translate_policy(ap({"rules": [{}]})).authorization.scope is Scope.NAMESPACE
    tp = translate_policy(ap({"rules": [{}]}, namespace="istio-system"))
    assert tp.authorization.scope is Scope.GLOBAL
    tp = translate_policy(ap({"rules": [{}]}, namespace="mesh-root"), root_namespace="mesh-root")
    assert tp.authorization.scope is Scope.GLOBAL


def test_missing_namespace_takes_the_default_like_kubectl():
    assert translate_policy(ap({}, namespace=None)).namespace == "default"
    assert translate_policy(ap({}, namespace=None), default_namespace="team").namespace == "team"


@pytest.mark.parametrize("field", ["targetRefs", "targetRef"])
def test_target_ref_policies_are_for_the_waypoint(field):
    ref = {"kind": "Service", "group": "", "name": "reviews"}
    spec = {field: [ref] if field == "targetRefs" else ref, "action": "CUSTOM", "provider": {"name": "ext"}}
    tp = translate_policy(ap(spec))
    assert tp.for_waypoint and tp.authorization is None
    assert tp.source["spec"][field]
    assert parse_policy_file(yaml.safe_dump(ap(spec))).policies == ()


# --- actions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["CUSTOM", "AUDIT"])
def test_custom_and_audit_are_refused(action):
    spec = {"action": action, "rules": [{}]}
    if action == "CUSTOM":
        spec["provider"] = {"name": "ext-authz"}
    with pytest.raises(ConfigError) as info:
        translate_policy(ap(spec))
    assert info.value.path == "spec.action"
    assert f"the {action} action is not supported" in str(info.value)


def test_empty_allow_allows_nothing_and_empty_rule_allows_everything():
    nothing = translate_policy(ap({})).authorization
    assert nothing.action is Action.ALLOW and nothing.rules == ()
    assert not evaluate(conn(SLEEP), [nothing]).allowed
    everything = translate_policy(ap({"rules": [{}]})).authorization
    assert evaluate(conn(None), [everything]).allowed


def test_deny_without_rules_is_refused_as_istio_does():
    with pytest.raises(ConfigError, match="add an empty rule"):
        translate_policy(ap({"action": "DENY"}))


# --- the fields users write -------------------------------------------------------------------------


def test_allow_by_principal():
    pol = translate_policy(
        ap({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}]}]})
    ).authorization
    assert evaluate(conn(SLEEP), [pol]).allowed
    assert not evaluate(conn(OTHER), [pol]).allowed
    assert not evaluate(conn(None), [pol]).allowed


def test_allow_by_principal_in_spiffe_form():
    pol = translate_policy(ap({"rules": [{"from": [{"source": {"principals": [SLEEP]}}]}]})).authorization
    assert evaluate(conn(SLEEP), [pol]).allowed
    assert not evaluate(conn(OTHER), [pol]).allowed


def test_allow_by_namespace_with_wildcards():
    pol = translate_policy(ap({"rules": [{"from": [{"source": {"namespaces": ["fo*", "*-prod"]}}]}]})).authorization
    assert evaluate(conn(OTHER), [pol]).allowed
    assert evaluate(conn("spiffe://cluster.local/ns/web-prod/sa/x"), [pol]).allowed
    assert not evaluate(conn(SLEEP), [pol]).allowed


def test_deny_by_port():
    pol = translate_policy(
        ap({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9999"]}}]}]})
    ).authorization
    assert not evaluate(conn(SLEEP, port=9999), [pol]).allowed
    assert evaluate(conn(SLEEP, port=8080), [pol]).allowed
    assert evaluate(conn(None, port=8080), [pol]).allowed


def test_service_accounts_default_to_the_policy_namespace():
    tp = translate_policy(
        ap({"rules": [{"from": [{"source": {"serviceAccounts": ["sleep", "foo/other"]}}]}]}, namespace="default")
    )
    m = tp.authorization.rules[0][0][0]
    assert m.service_accounts == (ServiceAccountMatch("default", "sleep"), ServiceAccountMatch("foo", "other"))
    assert evaluate(conn(SLEEP), [tp.authorization]).allowed
    assert evaluate(conn(OTHER), [tp.authorization]).allowed
    assert not evaluate(conn("spiffe://cluster.local/ns/default/sa/other"), [tp.authorization]).allowed


def test_ip_blocks_and_not_ip_blocks():
    pol = translate_policy(
        ap({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/16"], "notIpBlocks": ["10.0.0.5"]}}]}]})
    ).authorization
    assert evaluate(conn(src="10.0.3.3"), [pol]).allowed
    assert not evaluate(conn(src="10.0.0.5"), [pol]).allowed
    assert not evaluate(conn(src="192.168.1.1"), [pol]).allowed


def test_from_entries_are_ored_and_from_to_when_are_anded():
    spec = {
        "rules": [
            {
                "from": [
                    {"source": {"namespaces": ["foo"]}},
                    {"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}},
                ],
                "to": [{"operation": {"ports": ["8080", 9090]}}],
                "when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}],
            }
        ]
    }
    pol = translate_policy(ap(spec)).authorization
    # clauses: to, from, when
    assert [len(clause) for clause in pol.rules[0]] == [1, 2, 1]
    assert evaluate(conn(OTHER, port=9090), [pol]).allowed
    assert evaluate(conn(SLEEP, port=8080), [pol]).allowed
    assert not evaluate(conn(SLEEP, port=7070), [pol]).allowed
    assert not evaluate(conn(SLEEP, src="192.168.0.1"), [pol]).allowed
    assert not evaluate(conn("spiffe://cluster.local/ns/bar/sa/x"), [pol]).allowed


@pytest.mark.parametrize(
    ("key", "values", "not_values", "good", "bad"),
    [
        ("source.ip", ["10.0.0.5"], [], {"src": "10.0.0.5"}, {"src": "10.0.0.6"}),
        ("destination.ip", ["10.0.1.0/24"], [], {"dst": "10.0.1.9"}, {"dst": "10.0.2.9"}),
        ("destination.port", ["8080"], [], {"port": 8080}, {"port": 8081}),
        ("source.namespace", ["default"], [], {"identity": SLEEP}, {"identity": OTHER}),
        ("source.principal", ["cluster.local/ns/foo/*"], [], {"identity": OTHER}, {"identity": SLEEP}),
        ("destination.port", [], ["8080"], {"port": 9090}, {"port": 8080}),
        ("source.namespace", [], ["foo"], {"identity": SLEEP}, {"identity": OTHER}),
    ],
)
def test_l4_when_conditions(key, values, not_values, good, bad):
    cond = {"key": key}
    if values:
        cond["values"] = values
    if not_values:
        cond["notValues"] = not_values
    pol = translate_policy(ap({"rules": [{"when": [cond]}]})).authorization
    assert evaluate(conn(**good), [pol]).allowed
    assert not evaluate(conn(**bad), [pol]).allowed


def test_dry_run_annotation():
    tp = translate_policy(ap({"action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "true"}))
    assert tp.authorization.dry_run
    d = evaluate(conn(SLEEP), [tp.authorization])
    assert d.allowed and d.dry_run_allowed is False
    tp = translate_policy(ap({"rules": [{}]}, annotations={"istio.io/dry-run": "maybe"}))
    assert not tp.authorization.dry_run
    assert any("not a boolean" in w for w in tp.warnings)


# --- HTTP fields: fail closed as istiod does --------------------------------------------------------


def test_allow_rule_with_http_fields_is_dropped_and_warned():
    spec = {
        "rules": [
            {"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]},
            {"from": [{"source": {"namespaces": ["foo"]}}]},
        ]
    }
    tp = translate_policy(ap(spec))
    assert len(tp.authorization.rules) == 1  # only the namespace rule survives
    assert evaluate(conn(OTHER), [tp.authorization]).allowed
    assert not evaluate(conn(SLEEP, port=8080), [tp.authorization]).allowed  # GET on 8080 is not allowed at L4
    (warning,) = tp.warnings
    assert "methods" in warning and "allows less" in warning


def test_allow_with_only_http_rules_denies_everything():
    tp = translate_policy(ap({"rules": [{"to": [{"operation": {"paths": ["/health"]}}]}]}))
    assert tp.authorization.rules == ()
    for c in (conn(SLEEP), conn(OTHER), conn(None)):
        assert not evaluate(c, [tp.authorization]).allowed


def test_deny_with_only_http_parts_has_no_effect():
    tp = translate_policy(ap({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]}))
    assert not has_effective_rules(tp.authorization.rules)
    assert evaluate(conn(SLEEP), [tp.authorization]).allowed
    (warning,) = tp.warnings
    assert "no effect" in warning and "targetRefs" in warning


def test_mixed_deny_is_enforced_without_its_http_part():
    spec = {
        "action": "DENY",
        "rules": [
            {
                "from": [{"source": {"namespaces": ["foo"]}}],
                "to": [{"operation": {"methods": ["DELETE"], "ports": ["8080"]}}],
            }
        ],
    }
    tp = translate_policy(ap(spec))
    assert has_effective_rules(tp.authorization.rules)
    assert not evaluate(conn(OTHER, port=8080), [tp.authorization]).allowed  # every method, not just DELETE
    assert evaluate(conn(OTHER, port=9090), [tp.authorization]).allowed
    assert evaluate(conn(SLEEP, port=8080), [tp.authorization]).allowed
    assert "denies more" in tp.warnings[0]


def test_deny_with_http_when_key_is_a_noop_for_that_rule():
    spec = {"action": "DENY", "rules": [{"when": [{"key": "request.headers[x-user]", "values": ["bob"]}]}]}
    tp = translate_policy(ap(spec))
    assert evaluate(conn(SLEEP), [tp.authorization]).allowed
    assert "request.headers[x-user]" in tp.warnings[0]


@pytest.mark.parametrize(
    "source",
    [
        {"requestPrincipals": ["*"]},
        {"notRequestPrincipals": ["x/y"]},
        {"remoteIpBlocks": ["1.2.3.4"]},
        {"notRemoteIpBlocks": ["1.2.3.0/24"]},
    ],
)
def test_http_source_fields_are_reported(source):
    tp = translate_policy(ap({"rules": [{"from": [{"source": source}]}]}))
    assert tp.authorization.rules == ()
    assert next(iter(source)) in tp.warnings[0]


# --- validation as the webhook does it --------------------------------------------------------------

INVALID = [
    ({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}, "spec.rules[0].to[0].operation.ports[0]", "not a port"),
    (
        {"rules": [{"to": [{"operation": {"notPorts": ["0"]}}]}]},
        "spec.rules[0].to[0].operation.notPorts[0]",
        "not a port",
    ),
    (
        {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/40"]}}]}]},
        "spec.rules[0].from[0].source.ipBlocks[0]",
        "CIDR",
    ),
    (
        {"rules": [{"from": [{"source": {"remoteIpBlocks": ["x"]}}]}]},
        "spec.rules[0].from[0].source.remoteIpBlocks[0]",
        "CIDR",
    ),
    ({"rules": [{"from": [{"source": {}}]}]}, "spec.rules[0].from[0].source", "must not be empty"),
    ({"rules": [{"from": [{}]}]}, "spec.rules[0].from[0].source", "must not be empty"),
    ({"rules": [{"from": []}]}, "spec.rules[0].from", "must not be empty"),
    ({"rules": [{"to": [{"operation": {}}]}]}, "spec.rules[0].to[0].operation", "must not be empty"),
    ({"rules": [{"from": [{"source": {"namespaces": [""]}}]}]}, "spec.rules[0].from[0].source.namespaces[0]", "empty"),
    (
        {"rules": [{"from": [{"source": {"namespaces": ["a"], "serviceAccounts": ["b"]}}]}]},
        "spec.rules[0].from[0].source",
        "cannot set serviceAccounts",
    ),
    (
        {"rules": [{"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}]},
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "not a service account",
    ),
    ({"rules": [{"when": [{"key": "source.ip"}]}]}, "spec.rules[0].when[0]", "at least one of values or notValues"),
    (
        {"rules": [{"when": [{"key": "source.color", "values": ["x"]}]}]},
        "spec.rules[0].when[0].key",
        "unknown attribute",
    ),
    ({"rules": [{"when": [{"values": ["x"]}]}]}, "spec.rules[0].when[0].key", "must not be empty"),
    (
        {"rules": [{"when": [{"key": "destination.port", "values": ["x"]}]}]},
        "spec.rules[0].when[0].values[0]",
        "not a port",
    ),
    (
        {"rules": [{"from": [{"source": {"principal": ["x"]}}]}]},
        "spec.rules[0].from[0].source.principal",
        "unknown field",
    ),
    ({"action": "PERMIT"}, "spec.action", "not an action"),
    ({"action": "ALLOW", "provider": {"name": "x"}}, "spec.provider", "only a CUSTOM policy"),
    (
        {"selector": {"matchLabels": {"a": "b"}}, "targetRefs": [{"kind": "Service", "name": "s"}]},
        "spec",
        "only one of",
    ),
    ({"selector": {"labels": {"a": "b"}}}, "spec.selector.labels", "unknown field"),
]


@pytest.mark.parametrize(("spec", "path", "message"), INVALID, ids=[i[1] + ":" + i[2] for i in INVALID])
def test_invalid_policies_are_refused_with_the_field_path(spec, path, message):
    with pytest.raises(ConfigError) as info:
        translate_policy(ap(spec))
    assert info.value.path == path
    assert message in info.value.message


def test_wrong_kind_and_version():
    with pytest.raises(ConfigError, match="kind: expected AuthorizationPolicy"):
        translate_policy({**ap({}), "kind": "PeerAuthentication"})
    with pytest.raises(ConfigError, match="apiVersion"):
        translate_policy({**ap({}), "apiVersion": "security.istio.io/v2"})
    assert translate_policy({**ap({}), "apiVersion": "security.istio.io/v1beta1"}).authorization is not None


# --- files ------------------------------------------------------------------------------------------

MULTI = textwrap.dedent(
    """
    apiVersion: v1
    kind: Namespace
    metadata: {name: default}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-sleep, namespace: default}
    spec:
      selector: {matchLabels: {app: httpbin}}
      rules:
      - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-9999, namespace: istio-system}
    spec:
      action: DENY
      rules: [{to: [{operation: {ports: ["9999"]}}]}]
    """
)


def test_multi_document_file_skips_other_kinds():
    tps = parse_policy_documents(MULTI)
    assert [tp.key for tp in tps] == ["default/allow-sleep", "istio-system/deny-9999"]
    cs = parse_policy_file(MULTI)
    assert [p.scope for p in cs.policies] == [Scope.WORKLOAD_SELECTOR, Scope.GLOBAL]


def test_list_kind_and_errors_name_the_document():
    doc = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [ap({"rules": [{}]}, name="a"), ap({"action": "NOPE"}, name="b")],
    }
    with pytest.raises(ConfigError) as info:
        parse_policy_documents(yaml.safe_dump(doc))
    assert info.value.path == "documents[0].items[1].spec.action"


def test_duplicate_policy_in_a_file_is_refused():
    text = yaml.safe_dump(ap({})) + "---\n" + yaml.safe_dump(ap({}))
    with pytest.raises(ConfigError, match="duplicate AuthorizationPolicy default/p"):
        parse_policy_documents(text)


def test_native_entries_are_accepted_too():
    native = {
        "name": "n",
        "namespace": "ns",
        "scope": "Global",
        "action": "Deny",
        "rules": [[[{"destinationPorts": [1]}]]],
    }
    tp = parse_any_policy(native)
    assert tp.authorization.scope is Scope.GLOBAL and tp.authorization.rules[0][0][0].destination_ports == (1,)
    assert parse_any_policy(ap({"rules": [{}]})).authorization.scope is Scope.NAMESPACE
    with pytest.raises(ConfigError, match="scope"):
        parse_any_policy({**native, "scope": "Everywhere"})


# --- the fail-closed property -------------------------------------------------------------------------

http_ops = st.sampled_from([{"methods": ["GET"]}, {"paths": ["/x"]}, {"hosts": ["a.example"]}, {"notMethods": ["PUT"]}])
l4_sources = st.sampled_from(
    [{"namespaces": ["default"]}, {"namespaces": ["foo"]}, {"principals": ["*"]}, {"ipBlocks": ["10.0.0.0/24"]}]
)
l4_ports = st.sampled_from([["8080"], ["9090"], ["8080", "9090"]])


@st.composite
def istio_rules(draw: st.DrawFn) -> dict:
    rule: dict = {}
    if draw(st.booleans()):
        rule["from"] = [{"source": draw(l4_sources)}]
    if draw(st.booleans()):
        rule["to"] = [{"operation": {"ports": draw(l4_ports)}}]
    return rule


connections = st.builds(
    conn,
    identity=st.sampled_from([None, SLEEP, OTHER]),
    port=st.sampled_from([8080, 9090]),
    src=st.sampled_from(["10.0.0.5", "10.9.9.9"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(istio_rules(), min_size=1, max_size=3), st.data(), connections)
def test_adding_http_conditions_to_an_allow_never_allows_more(rules, data, c):
    plain = translate_policy(ap({"rules": rules})).authorization
    target = data.draw(st.integers(0, len(rules) - 1))
    with_http = [dict(r) for r in rules]
    op = dict(data.draw(http_ops))
    with_http[target] = {**with_http[target], "to": [{"operation": op}]}
    restricted = translate_policy(ap({"rules": with_http})).authorization
    if evaluate(c, [restricted]).allowed:
        assert evaluate(c, [plain]).allowed
    assert len(restricted.rules) == len(rules) - 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(istio_rules(), min_size=1, max_size=3), st.data(), connections)
def test_dropping_http_parts_of_a_deny_never_denies_less_on_matching_l4(rules, data, c):
    """A mixed DENY keeps its L4 parts: whatever the L4 rule denies stays denied with HTTP added."""
    l4 = translate_policy(ap({"action": "DENY", "rules": rules})).authorization
    with_http = []
    for r in rules:
        r = dict(r)
        if "to" in r:
            r["to"] = [{"operation": {**r["to"][0]["operation"], **data.draw(http_ops)}}]
        with_http.append(r)
    mixed = translate_policy(ap({"action": "DENY", "rules": with_http})).authorization
    assert policy_matches(mixed, c) == policy_matches(l4, c)
