"""The model's own behaviour: identities, string matches, selectors, immutability."""

from __future__ import annotations

import ipaddress

import pytest

from mesh.config.model import (
    Action,
    Authorization,
    HealthStatus,
    Match,
    Scope,
    Service,
    StringMatch,
    Workload,
    principal_match,
)


def test_workload_identity_defaults():
    w = Workload("u", "n", "prod", ("10.0.0.1",), service_account="")
    assert w.identity == "spiffe://cluster.local/ns/prod/sa/default"
    w = Workload("u", "n", "prod", ("10.0.0.1",), service_account="api", trust_domain="example.org")
    assert w.identity == "spiffe://example.org/ns/prod/sa/api"
    assert w.workload_ips == (ipaddress.ip_address("10.0.0.1"),)


def test_workload_rejects_bad_values_at_construction():
    with pytest.raises(ValueError):
        Workload("u", "n", "ns", ("nope",))
    with pytest.raises(ValueError):
        Workload("u", "n", "ns", (), protocol="QUIC")


def test_models_are_hashable_and_comparable():
    a = Workload("u", "n", "ns", ("10.0.0.1",), labels={"a": "b"}, services={"ns/h": {80: 8080}})
    b = Workload("u", "n", "ns", ("10.0.0.1",), labels={"a": "b"}, services={"ns/h": {80: 8080}})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Workload("u", "n", "ns", ("10.0.0.1",), labels={"a": "c"})
    s = Service("s", "ns", "h", ports={80: 8080})
    assert hash(s) == hash(Service("s", "ns", "h", ports={80: 8080}))


@pytest.mark.parametrize(
    ("pattern", "kind_value"),
    [("*", ("presence", "")), ("*.svc", ("suffix", ".svc")), ("team-*", ("prefix", "team-")), ("x", ("exact", "x"))],
)
def test_istio_wildcards_parse_and_print_back(pattern, kind_value):
    m = StringMatch.from_istio(pattern)
    assert (m.kind.value, m.value) == kind_value
    assert str(m) == pattern


def test_principal_patterns_accept_both_spellings():
    assert principal_match("spiffe://cluster.local/ns/a/sa/b") == StringMatch.exact("cluster.local/ns/a/sa/b")
    assert principal_match("spiffe://cluster.local/ns/a/*") == StringMatch.prefix("cluster.local/ns/a/")
    assert principal_match("*/sa/b") == StringMatch.suffix("/sa/b")
    assert Match(principals=[StringMatch.exact("spiffe://td/ns/a/sa/b")]).principals == (
        StringMatch.exact("td/ns/a/sa/b"),
    )


def test_selector_policies_select_by_labels_and_namespace():
    web = Workload("u", "web", "shop", ("10.0.0.1",), labels={"app": "web", "tier": "front"})
    sel = Authorization("p", "shop", Scope.WORKLOAD_SELECTOR, Action.ALLOW, selector={"app": "web"})
    assert sel.selects(web)
    assert not Authorization("p", "other", Scope.WORKLOAD_SELECTOR, Action.ALLOW, selector={"app": "web"}).selects(web)
    assert Authorization("p", "istio-system", Scope.WORKLOAD_SELECTOR, Action.ALLOW, selector={"app": "web"}).selects(
        web
    )
    assert Authorization("p", "shop", Scope.WORKLOAD_SELECTOR, Action.ALLOW, selector={}).selects(web)
    assert not Authorization("p", "shop", Scope.WORKLOAD_SELECTOR, Action.ALLOW, selector={"app": "db"}).selects(web)
    assert not Authorization("p", "shop", Scope.NAMESPACE, Action.ALLOW).selects(web)


def test_match_repr_shows_only_what_is_set():
    assert repr(Match(destination_ports=[80], source_ips=["10.0.0.0/8"])) == (
        "Match(source_ips=[10.0.0.0/8], destination_ports=[80])"
    )
    assert Match().is_empty() and not Match(not_destination_ports=[1]).is_empty()


def test_service_health_policy():
    s = Service("s", "ns", "h")
    assert s.accepts(HealthStatus.HEALTHY) and not s.accepts(HealthStatus.UNHEALTHY)
    assert s.key == "ns/h"
