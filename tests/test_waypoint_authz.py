"""L7 AuthorizationPolicy at the waypoint, from the YAML users apply: DENY then ALLOW, every match
field, the 403 users see, binding by targetRefs, and fail-closed handling of what cannot be checked."""

from __future__ import annotations

import pytest
import yaml

from waypoint.authz import evaluate
from waypoint.config import ConfigStore, WaypointIdentity
from waypoint.config.model import ServiceRef
from waypoint.routing import Headers, RequestView

SVC = ServiceRef("default", "httpbin")
SLEEP = "cluster.local/ns/default/sa/sleep"
OTHER = "cluster.local/ns/foo/sa/other"


def store_with(*policies: str, waypoint: WaypointIdentity | None = None) -> ConfigStore:
    store = ConfigStore(waypoint=waypoint)
    for text in policies:
        result = store.apply(yaml.safe_load(text))
        assert result.accepted, result.message
    return store


def policy(spec: str, name: str = "p", namespace: str = "default", target: str = "httpbin") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  targetRefs: [{{kind: Service, group: "", name: {target}}}]
{spec}
"""


def decide(store: ConfigStore, path: str = "/", method: str = "GET", principal: str = SLEEP, headers=None,
           authority: str = "httpbin:8000", port: int = 8000, **kw):
    request = RequestView(method, path, authority, headers=Headers(headers or {}), source_principal=principal,
                          destination_port=port, **kw)
    return evaluate(store.snapshot().authz_policies(SVC), request)


def test_no_policy_allows():
    assert decide(store_with()).allowed


def test_deny_gives_403_rbac_access_denied_naming_the_policy():
    store = store_with(policy("""  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]""", name="no-delete"))
    d = decide(store, method="DELETE")
    assert not d.allowed
    reply = d.reply()
    assert reply.status == 403 and reply.body == b"RBAC: access denied"
    assert reply.details == "rbac_access_denied_matched_policy[ns[default]-policy[no-delete]-rule[0]]"
    assert decide(store, method="GET").allowed  # DENY alone does not turn on default-deny


def test_deny_wins_over_allow_and_allow_exists_means_default_deny():
    store = store_with(
        policy("""  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/*"]}}]}]""", name="allow-default"),
        policy("""  action: DENY
  rules: [{to: [{operation: {paths: [/admin*]}}]}]""", name="deny-admin"),
    )
    assert decide(store, "/data").allowed
    assert not decide(store, "/admin/users").allowed
    denied = decide(store, "/data", principal=OTHER)
    assert not denied.allowed and denied.reply().details == "rbac_access_denied_matched_policy[none]"


def test_allow_without_rules_denies_everything_and_an_empty_rule_allows_everything():
    assert not decide(store_with(policy("  action: ALLOW"))).allowed
    assert decide(store_with(policy("  action: ALLOW\n  rules: [{}]"))).allowed


@pytest.mark.parametrize(
    ("operation", "request_kw", "allowed"),
    [
        ("{paths: [/info]}", {"path": "/info?x=1"}, True),
        ("{paths: [/info]}", {"path": "/info/"}, False),
        ("{paths: [/api/*]}", {"path": "/api/v1/x"}, True),
        ("{paths: ['*.png']}", {"path": "/img/a.png"}, True),
        ("{paths: ['/store/{*}/items']}", {"path": "/store/42/items"}, True),
        ("{paths: ['/store/{*}/items']}", {"path": "/store/4/2/items"}, False),
        ("{paths: ['/files/{**}']}", {"path": "/files/a/b/c.txt"}, True),
        ("{notPaths: [/private*]}", {"path": "/private/x"}, False),
        ("{notPaths: [/private*]}", {"path": "/public"}, True),
        ("{methods: [GET, HEAD]}", {"method": "HEAD"}, True),
        ("{methods: [GET]}", {"method": "POST"}, False),
        ("{notMethods: [DELETE]}", {"method": "PUT"}, True),
        ("{hosts: [HTTPBIN:8000]}", {"authority": "httpbin:8000"}, True),
        ("{hosts: [httpbin]}", {"authority": "httpbin:8000"}, False),  # Istio: the port is part of the host
        ("{hosts: ['httpbin:*']}", {"authority": "HttpBin:8000"}, True),
        ("{hosts: ['*.example.com']}", {"authority": "api.EXAMPLE.com"}, True),
        ("{notHosts: ['evil.com']}", {"authority": "httpbin:8000"}, True),
        ("{ports: ['8000']}", {"port": 8000}, True),
        ("{ports: ['9000']}", {"port": 8000}, False),
        ("{notPorts: ['8000']}", {"port": 8000}, False),
        ("{methods: [POST], paths: [/pkg.Svc/*]}",
         {"method": "GET", "path": "/pkg.Svc/Call", "headers": {"content-type": "application/grpc"}}, True),
    ],
)
def test_operation_fields(operation, request_kw, allowed):
    store = store_with(policy(f"""  action: ALLOW
  rules: [{{to: [{{operation: {operation}}}]}}]"""))
    assert decide(store, **request_kw).allowed is allowed


@pytest.mark.parametrize(
    ("source", "principal", "kw", "allowed"),
    [
        ("{principals: [cluster.local/ns/default/sa/sleep]}", SLEEP, {}, True),
        ("{principals: [cluster.local/ns/default/sa/sleep]}", "spiffe://" + SLEEP, {}, True),
        ("{principals: ['spiffe://cluster.local/ns/default/sa/sleep']}", SLEEP, {}, True),
        ("{principals: ['*']}", None, {}, False),
        ("{principals: ['*/sa/sleep']}", SLEEP, {}, True),
        ("{notPrincipals: ['*/sa/sleep']}", SLEEP, {}, False),
        ("{namespaces: [foo]}", OTHER, {}, True),
        ("{namespaces: [foo]}", SLEEP, {}, False),
        ("{notNamespaces: [foo]}", SLEEP, {}, True),
        ("{serviceAccounts: [default/sleep]}", SLEEP, {}, True),
        ("{serviceAccounts: [default/sleep]}", OTHER, {}, False),
        ("{ipBlocks: [10.0.0.0/8]}", SLEEP, {"source_ip": "10.1.2.3"}, True),
        ("{ipBlocks: [10.0.0.0/8]}", SLEEP, {"source_ip": "192.168.1.1"}, False),
        ("{notIpBlocks: ['10.1.2.3']}", SLEEP, {"source_ip": "10.1.2.3"}, False),
        ("{remoteIpBlocks: [203.0.113.0/24]}", SLEEP, {"source_ip": "10.0.0.1", "remote_ip": "203.0.113.9"}, True),
    ],
)
def test_source_fields(source, principal, kw, allowed):
    store = store_with(policy(f"""  action: ALLOW
  rules: [{{from: [{{source: {source}}}]}}]"""))
    assert decide(store, principal=principal, **kw).allowed is allowed


@pytest.mark.parametrize(
    ("condition", "kw", "allowed"),
    [
        ("{key: 'request.headers[X-Token]', values: [abc*]}", {"headers": {"x-token": "abcdef"}}, True),
        ("{key: 'request.headers[x-token]', values: [abc]}", {"headers": {"x-token": "zzz, abc"}}, True),
        ("{key: 'request.headers[x-token]', values: [abc]}", {}, False),
        ("{key: 'request.headers[x-token]', notValues: [bad]}", {"headers": {"x-token": "bad"}}, False),
        ("{key: source.namespace, values: [default]}", {}, True),
        ("{key: source.principal, values: ['*/sa/sleep']}", {}, True),
        ("{key: source.ip, values: [10.0.0.0/16]}", {"source_ip": "10.0.5.5"}, True),
        ("{key: destination.port, values: ['8000']}", {}, True),
        ("{key: destination.port, notValues: ['8000']}", {}, False),
        ("{key: connection.sni, values: ['*.local']}", {"sni": "httpbin.default.svc.cluster.local"}, True),
    ],
)
def test_when_conditions(condition, kw, allowed):
    store = store_with(policy(f"""  action: ALLOW
  rules: [{{when: [{condition}]}}]"""))
    assert decide(store, **kw).allowed is allowed


def test_within_a_rule_from_to_when_are_anded_and_rules_are_ored():
    store = store_with(policy("""  action: ALLOW
  rules:
  - from: [{source: {namespaces: [foo]}}]
    to: [{operation: {methods: [GET]}}]
  - to: [{operation: {paths: [/healthz]}}]"""))
    assert decide(store, principal=OTHER, method="GET").allowed
    assert not decide(store, principal=OTHER, method="POST").allowed
    assert not decide(store, principal=SLEEP, method="GET").allowed
    assert decide(store, "/healthz", principal=SLEEP, method="POST").allowed


def test_jwt_attributes_fail_closed_in_both_directions():
    allow_jwt = store_with(policy("""  action: ALLOW
  rules: [{from: [{source: {requestPrincipals: ["issuer/*"]}}]}]"""))
    assert not decide(allow_jwt).allowed
    deny_jwt = store_with(policy("""  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}], when: [{key: 'request.auth.claims[group]', values: [admins]}]}]"""))
    assert not decide(deny_jwt, "/admin").allowed
    assert decide(deny_jwt, "/public").allowed


def test_binding_by_target_refs_only():
    wp = WaypointIdentity(namespace="default", name="waypoint")
    store = store_with(
        policy("  action: ALLOW\n  rules: [{to: [{operation: {methods: [GET]}}]}]", name="svc", target="httpbin"),
        policy("  action: DENY\n  rules: [{}]", name="other-svc", target="productpage"),
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: selector-based, namespace: default}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{}]
""",
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: whole-waypoint, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: [TRACE]}}]}]
""",
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec:
  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: [CONNECT]}}]}]
""",
        waypoint=wp,
    )
    names = {p.name for p in store.snapshot().authz_policies(SVC)}
    assert names == {"svc", "whole-waypoint", "mesh-wide"}
    assert decide(store, method="GET").allowed
    assert not decide(store, method="TRACE").allowed
    assert not decide(store, method="CONNECT").allowed
    assert not decide(store, method="POST").allowed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("  action: CUSTOM\n  provider: {name: ext}", "spec.action: action CUSTOM is not supported by this waypoint"),
        ("  action: AUDIT", "spec.action: action AUDIT is not supported"),
        ("  action: MAYBE", "spec.action: must be one of ALLOW, DENY, AUDIT, CUSTOM"),
        ("  rules: [{to: [{operation: {paths: ['/a/*/b']}}]}]",
         "spec.rules[0].to[0].operation.paths[0]: '/a/*/b': '*' is allowed only at the start or the end"),
        ("  rules: [{to: [{operation: {paths: ['/a/{**}/b']}}]}]", "{**} must be the last segment"),
        ("  rules: [{to: [{operation: {ports: ['http']}}]}]", "spec.rules[0].to[0].operation.ports[0]"),
        ("  rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]", "is not an IP address or CIDR block"),
        ("  rules: [{when: [{key: request.bogus, values: [x]}]}]", "spec.rules[0].when[0].key: unknown attribute"),
        ("  rules: [{when: [{key: source.ip}]}]", "set at least one of values and notValues"),
        ("  rules: [{from: [{}]}]", "spec.rules[0].from[0].source: required field is missing"),
        ("  rules: [{to: [{operation: {methodz: [GET]}}]}]", "spec.rules[0].to[0].operation.methodz: unknown field"),
        ("  selector: {matchLabels: {app: x}}", "spec.selector: selector and targetRefs are mutually exclusive"),
    ],
)
def test_bad_policies_are_rejected_naming_the_field(spec, message):
    store = ConfigStore()
    result = store.apply(yaml.safe_load(policy(spec, name="bad")))
    assert not result.accepted
    assert result.message.startswith("AuthorizationPolicy default/bad: ")
    assert message in result.message
