"""L4 policy evaluation: every Match field, the nesting rules, and Istio's ALLOW/DENY algorithm.

The tables follow the cases ztunnel's own rbac tests pin down (a plaintext peer, a peer in the policy's
namespace, a peer elsewhere), so a policy decides here exactly as it would in ztunnel.
"""

from __future__ import annotations

import ipaddress

import pytest

from mesh.authz import ConnInfo, Decision, Reason, evaluate, peer_of, policy_matches
from mesh.config.model import (
    Action,
    Authorization,
    Match,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from mesh.identity import SpiffeId

PLAIN = ConnInfo(src_ip="127.0.0.1", src_port=1234, dst_ip="127.0.0.2", dst_port=8080)
TLS = ConnInfo(
    src_ip="127.0.0.1",
    src_port=1234,
    dst_ip="127.0.0.2",
    dst_port=8080,
    src_identity="spiffe://td/ns/namespace/sa/account",
)
TLS_ALT = ConnInfo(
    src_ip="127.0.0.3",
    src_port=1234,
    dst_ip="127.0.0.4",
    dst_port=9090,
    src_identity="spiffe://td-alt/ns/ns-alt/sa/sa-alt",
)


def policy(*rules, action=Action.ALLOW, name="p", namespace="namespace", dry_run=False) -> Authorization:
    return Authorization(name, namespace, Scope.NAMESPACE, action, rules=rules, dry_run=dry_run)


def one(**fields) -> Authorization:
    """A policy with a single rule, clause and match."""
    return policy(((Match(**fields),),))


def allow(*rules, name="allow"):
    return policy(*rules, action=Action.ALLOW, name=name)


def deny(*rules, name="deny"):
    return policy(*rules, action=Action.DENY, name=name)


def rule(**fields):
    return ((Match(**fields),),)


# --- each field, positive and negative: (plaintext, tls, tls_alt) ------------------------------------

FIELD_CASES = [
    ("namespaces", [StringMatch.exact("namespace")], (False, True, False)),
    ("not_namespaces", [StringMatch.exact("namespace")], (True, False, True)),
    ("service_accounts", [ServiceAccountMatch("namespace", "account")], (False, True, False)),
    ("not_service_accounts", [ServiceAccountMatch("namespace", "account")], (True, False, True)),
    ("principals", [StringMatch.exact("td/ns/namespace/sa/account")], (False, True, False)),
    ("not_principals", [StringMatch.exact("td/ns/namespace/sa/account")], (True, False, True)),
    ("source_ips", ["127.0.0.1/32"], (True, True, False)),
    ("not_source_ips", ["127.0.0.1/32"], (False, False, True)),
    ("destination_ips", ["127.0.0.2/32"], (True, True, False)),
    ("not_destination_ips", ["127.0.0.2/32"], (False, False, True)),
    ("destination_ips", ["127.0.0.1/24"], (True, True, True)),
    ("destination_ports", [8080], (True, True, False)),
    ("not_destination_ports", [8080], (False, False, True)),
    # presence: any identity at all
    ("principals", [StringMatch.presence()], (False, True, True)),
    ("not_principals", [StringMatch.presence()], (True, False, False)),
    ("namespaces", [StringMatch.presence()], (False, True, True)),
    # values of one field are ORed
    ("namespaces", [StringMatch.exact("nope"), StringMatch.exact("ns-alt")], (False, False, True)),
    ("destination_ports", [1, 9090, 8080], (True, True, True)),
    ("not_destination_ports", [1, 9090, 8080], (False, False, False)),
    ("principals", [StringMatch.prefix("td/")], (False, True, False)),
    ("principals", [StringMatch.prefix("td")], (False, True, True)),
    ("principals", [StringMatch.suffix("/sa/account")], (False, True, False)),
    ("service_accounts", [ServiceAccountMatch("ns-alt", "sa-alt")], (False, False, True)),
]


@pytest.mark.parametrize(
    ("field", "values", "expected"), FIELD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FIELD_CASES)]
)
def test_each_field(field, values, expected):
    pol = one(**{field: values})
    got = tuple(policy_matches(pol, c) for c in (PLAIN, TLS, TLS_ALT))
    assert got == expected


def test_service_account_ignores_trust_domain():
    pol = one(service_accounts=[ServiceAccountMatch("namespace", "account")])
    other_td = ConnInfo("127.0.0.1", "127.0.0.2", 80, src_identity="spiffe://elsewhere.example/ns/namespace/sa/account")
    assert policy_matches(pol, other_td)


def test_principal_written_with_spiffe_scheme_matches_like_istio_form():
    istio_form = one(principals=[StringMatch.exact("td/ns/namespace/sa/account")])
    full_form = one(principals=[StringMatch.exact("spiffe://td/ns/namespace/sa/account")])
    for conn in (PLAIN, TLS, TLS_ALT):
        assert policy_matches(istio_form, conn) == policy_matches(full_form, conn)
    assert policy_matches(full_form, TLS)


def test_fields_within_a_match_are_anded():
    pol = one(namespaces=[StringMatch.exact("namespace")], destination_ports=[9090])
    assert not policy_matches(pol, TLS)  # namespace ok, port wrong
    assert not policy_matches(pol, TLS_ALT)  # port ok, namespace wrong
    ok = ConnInfo("127.0.0.1", "127.0.0.2", 9090, src_identity=TLS.src_identity)
    assert policy_matches(pol, ok)


def test_positive_and_negative_of_one_field_combine():
    pol = one(destination_ports=[8080, 9090], not_destination_ports=[9090])
    assert policy_matches(pol, TLS)
    assert not policy_matches(pol, TLS_ALT)


def test_nesting_matches_ored_clauses_anded():
    # from ztunnel's rbac_nesting: (ns a OR ns b) AND port 80
    pol = policy(
        (
            (Match(namespaces=[StringMatch.exact("a")]), Match(namespaces=[StringMatch.exact("b")])),
            (Match(destination_ports=[80]),),
        )
    )

    def conn(ns, port):
        return ConnInfo("127.0.0.1", "127.0.0.2", port, src_identity=f"spiffe://td/ns/{ns}/sa/x")

    assert policy_matches(pol, conn("a", 80))
    assert policy_matches(pol, conn("b", 80))
    assert not policy_matches(pol, conn("bad", 80))
    assert not policy_matches(pol, conn("b", 12345))


def test_rules_are_ored():
    pol = policy(rule(namespaces=[StringMatch.exact("a")]), rule(namespaces=[StringMatch.exact("b")]))
    for ns, expected in (("a", True), ("b", True), ("c", False)):
        conn = ConnInfo("127.0.0.1", "127.0.0.2", 1, src_identity=f"spiffe://td/ns/{ns}/sa/x")
        assert policy_matches(pol, conn) is expected


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ((), False),  # no rules: never matches
        (((),), True),  # a rule with no clauses: always
        ((((),),), True),  # a clause with no matches: matches
        ((((Match(),),),), False),  # an empty Match is skipped: never matches
        ((((Match(), Match(destination_ports=[8080])),),), True),  # the non-empty alternative decides
        ((((Match(),),), ((Match(destination_ports=[8080]),),)), True),  # another rule can still match
    ],
    ids=["no-rules", "empty-rule", "empty-clause", "empty-match", "empty-and-real", "second-rule"],
)
def test_empty_structures(rules, expected):
    pol = policy(*rules)
    assert policy_matches(pol, PLAIN) is expected


# --- the algorithm ----------------------------------------------------------------------------------

EVERYTHING = ((),)  # a rule with no clauses


def test_no_policies_allows():
    d = evaluate(PLAIN, [])
    assert d.allowed and d.reason is Reason.NO_ALLOW_POLICY and d.policy is None
    assert d.response_flags == "-"


def test_only_non_matching_deny_allows():
    d = evaluate(TLS, [deny(rule(destination_ports=[1]))])
    assert d.allowed and d.reason is Reason.NO_ALLOW_POLICY


def test_deny_wins_over_allow():
    d = evaluate(TLS, [allow(EVERYTHING), deny(rule(destination_ports=[8080]), name="deny-8080")])
    assert not d.allowed
    assert d.reason is Reason.DENY_MATCHED
    assert d.policy == "namespace/deny-8080"
    assert d.response_flags == "DENY"


def test_allow_exists_but_does_not_match_denies():
    d = evaluate(TLS_ALT, [allow(rule(namespaces=[StringMatch.exact("namespace")]))])
    assert not d.allowed and d.reason is Reason.NO_ALLOW_MATCHED and d.policy is None


def test_any_allow_match_allows():
    pols = [
        allow(rule(namespaces=[StringMatch.exact("nope")]), name="a1"),
        allow(rule(destination_ports=[9090]), name="a2"),
    ]
    d = evaluate(TLS_ALT, pols)
    assert d.allowed and d.reason is Reason.ALLOW_MATCHED and d.policy == "namespace/a2"


def test_allow_nothing_policy_denies_everything():
    # Istio's "allow-nothing": an ALLOW with no rules
    for conn in (PLAIN, TLS, TLS_ALT):
        assert not evaluate(conn, [allow()]).allowed


def test_plaintext_is_denied_by_principal_allow_and_by_strict_deny():
    mtls_only = deny(rule(not_principals=[StringMatch.presence()]), name="strict")
    assert not evaluate(PLAIN, [mtls_only]).allowed
    assert evaluate(TLS, [mtls_only]).allowed
    by_principal = allow(rule(principals=[StringMatch.exact("td/ns/namespace/sa/account")]))
    assert not evaluate(PLAIN, [by_principal]).allowed
    assert evaluate(TLS, [by_principal]).allowed


def test_duplicate_policy_objects_count_once():
    pol = deny(rule(destination_ports=[8080]))
    d = evaluate(TLS, [pol, pol])
    assert not d.allowed and d.policy == "namespace/deny"


# --- dry run ----------------------------------------------------------------------------------------


def test_dry_run_deny_never_denies_but_is_reported():
    dry = policy(rule(destination_ports=[8080]), action=Action.DENY, name="try-deny", dry_run=True)
    d = evaluate(TLS, [dry])
    assert d.allowed
    assert d.dry_run_matched == ("namespace/try-deny",)
    assert d.dry_run_allowed is False


def test_dry_run_allow_does_not_turn_allow_all_into_deny():
    dry = policy(rule(namespaces=[StringMatch.exact("nope")]), action=Action.ALLOW, name="try-allow", dry_run=True)
    d = evaluate(TLS, [dry])
    assert d.allowed and d.reason is Reason.NO_ALLOW_POLICY
    assert d.dry_run_matched == ()
    assert d.dry_run_allowed is False  # enforcing it would deny this connection


def test_dry_run_does_not_rescue_a_denied_connection():
    dry = policy(EVERYTHING, action=Action.ALLOW, name="try", dry_run=True)
    d = evaluate(TLS_ALT, [allow(rule(namespaces=[StringMatch.exact("namespace")])), dry])
    assert not d.allowed
    assert d.dry_run_allowed is True


def test_no_dry_run_policy_reports_none():
    assert evaluate(TLS, [allow(EVERYTHING)]).dry_run_allowed is None


# --- identities and addresses -----------------------------------------------------------------------


def test_identity_objects_and_strings_decide_alike():
    pol = one(principals=[StringMatch.exact("td/ns/namespace/sa/account")], namespaces=[StringMatch.exact("namespace")])
    as_obj = ConnInfo("127.0.0.1", "127.0.0.2", 8080, src_identity=SpiffeId("td", "namespace", "account"))
    assert policy_matches(pol, as_obj) == policy_matches(pol, TLS) is True


def test_non_workload_identity_matches_only_by_principal():
    p = peer_of("spiffe://td/something/else")
    assert p.principal == "td/something/else" and p.namespace == ""
    conn = ConnInfo("127.0.0.1", "127.0.0.2", 1, src_identity="spiffe://td/something/else")
    assert not policy_matches(one(namespaces=[StringMatch.presence()]), conn)
    assert policy_matches(one(principals=[StringMatch.prefix("td/")]), conn)


def test_ipv6_and_mixed_families():
    pol = one(source_ips=["fd00::/8"])
    v6 = ConnInfo("fd00::1", "fd00::2", 80)
    assert policy_matches(pol, v6)
    assert not policy_matches(pol, PLAIN)  # an IPv4 source is never inside an IPv6 block
    assert policy_matches(one(not_source_ips=["fd00::/8"]), PLAIN)


def test_conninfo_normalises_addresses_and_rejects_bad_ports():
    c = ConnInfo("10.0.0.1", "10.0.0.2", 80)
    assert c.src_ip == ipaddress.ip_address("10.0.0.1")
    with pytest.raises(ValueError, match="not a port"):
        ConnInfo("10.0.0.1", "10.0.0.2", 70000)
    with pytest.raises(ValueError):
        ConnInfo("not-an-ip", "10.0.0.2", 80)


def test_decision_renders_for_logs():
    d = Decision(False, "ns/deny-9999", Reason.DENY_MATCHED)
    assert str(d) == "deny: denied by a DENY policy (ns/deny-9999)"
