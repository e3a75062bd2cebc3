"""Properties of the L4 decision that must hold for every policy set and connection.

Generated from small value pools so that matches and misses are both frequent.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.authz import ConnInfo, evaluate, policy_matches
from mesh.config.model import MATCH_FIELDS, Action, Authorization, Match, Scope, ServiceAccountMatch, StringMatch

NAMESPACES = ["default", "prod", "dev"]
ACCOUNTS = ["sleep", "httpbin"]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.1.7", "192.168.5.5"]
CIDRS = ["10.0.0.0/24", "10.0.0.1/32", "10.0.0.0/8", "192.168.0.0/16", "0.0.0.0/0"]
PORTS = [80, 8080, 9090]

# Per-test settings (a loaded profile would leak into every other module's hypothesis tests).
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

identities = st.one_of(
    st.none(),
    st.builds(
        lambda td, ns, sa: f"spiffe://{td}/ns/{ns}/sa/{sa}",
        st.sampled_from(["cluster.local", "other.td"]),
        st.sampled_from(NAMESPACES),
        st.sampled_from(ACCOUNTS),
    ),
)

conns = st.builds(
    ConnInfo,
    src_ip=st.sampled_from(IPS),
    dst_ip=st.sampled_from(IPS),
    dst_port=st.sampled_from(PORTS),
    src_identity=identities,
)

string_matches = st.one_of(
    st.builds(StringMatch.exact, st.sampled_from([*NAMESPACES, ""])),
    st.builds(StringMatch.prefix, st.sampled_from(["d", "pr", ""])),
    st.builds(StringMatch.suffix, st.sampled_from(["v", "od"])),
    st.just(StringMatch.presence()),
)
principal_matches = st.one_of(
    st.builds(
        lambda ns, sa: StringMatch.exact(f"cluster.local/ns/{ns}/sa/{sa}"),
        st.sampled_from(NAMESPACES),
        st.sampled_from(ACCOUNTS),
    ),
    st.builds(StringMatch.prefix, st.sampled_from(["cluster.local/", "other.td/ns/prod/"])),
    st.builds(StringMatch.suffix, st.sampled_from(["/sa/sleep", "/sa/httpbin"])),
    st.just(StringMatch.presence()),
)
sa_matches = st.builds(ServiceAccountMatch, st.sampled_from(NAMESPACES), st.sampled_from(ACCOUNTS))
cidrs = st.sampled_from(CIDRS)
ports = st.sampled_from([*PORTS, 1])

VALUE_STRATEGY = {
    "namespaces": string_matches,
    "service_accounts": sa_matches,
    "principals": principal_matches,
    "source_ips": cidrs,
    "destination_ips": cidrs,
    "destination_ports": ports,
}


def _values_for(field: str) -> st.SearchStrategy:
    return VALUE_STRATEGY[field.removeprefix("not_")]


@st.composite
def matches(draw: st.DrawFn) -> Match:
    fields = draw(st.lists(st.sampled_from(MATCH_FIELDS), min_size=0, max_size=3, unique=True))
    return Match(**{f: draw(st.lists(_values_for(f), min_size=1, max_size=3)) for f in fields})


rules = st.lists(st.lists(matches(), min_size=0, max_size=3), min_size=0, max_size=3)


@st.composite
def policies(draw: st.DrawFn, action: Action | None = None, dry_run: bool | None = None) -> Authorization:
    return Authorization(
        name=f"p{draw(st.integers(0, 10_000))}",
        namespace="default",
        scope=Scope.NAMESPACE,
        action=action or draw(st.sampled_from(list(Action))),
        rules=tuple(draw(st.lists(rules, min_size=0, max_size=3))),
        dry_run=draw(st.booleans()) if dry_run is None else dry_run,
    )


def _unique(pols: list[Authorization]) -> list[Authorization]:
    seen: dict[str, Authorization] = {}
    for p in pols:
        seen.setdefault(p.key, p)
    return list(seen.values())


policy_sets = st.lists(policies(), max_size=5).map(_unique)


@PROPERTY
@given(conns, policy_sets, policies(action=Action.DENY, dry_run=False))
def test_adding_a_deny_never_turns_deny_into_allow(conn, pols, extra):
    pols = [p for p in pols if p.key != extra.key]
    before = evaluate(conn, pols)
    after = evaluate(conn, [*pols, extra])
    if not before.allowed:
        assert not after.allowed
    if policy_matches(extra, conn):
        assert not after.allowed


@PROPERTY
@given(conns, policy_sets)
def test_an_allow_matching_everything_allows_all_that_is_not_denied(conn, pols):
    allow_all = Authorization("allow-all", "default", Scope.NAMESPACE, Action.ALLOW, rules=((),))
    pols = [p for p in pols if p.key != allow_all.key]
    denied = any(p.action is Action.DENY and not p.dry_run and policy_matches(p, conn) for p in pols)
    assert evaluate(conn, [*pols, allow_all]).allowed is (not denied)


@PROPERTY
@given(conns, st.sampled_from([f for f in MATCH_FIELDS if not f.startswith("not_")]), st.data())
def test_not_field_is_the_negation_of_the_positive_field(conn, field, data):
    values = data.draw(st.lists(_values_for(field), min_size=1, max_size=3))
    pos = Authorization("pos", "default", Scope.NAMESPACE, Action.ALLOW, rules=(((Match(**{field: values}),),),))
    neg = Authorization(
        "neg", "default", Scope.NAMESPACE, Action.ALLOW, rules=(((Match(**{f"not_{field}": values}),),),)
    )
    assert policy_matches(neg, conn) is (not policy_matches(pos, conn))


@PROPERTY
@given(conns, policy_sets, st.randoms(use_true_random=False))
def test_policy_order_does_not_change_the_verdict(conn, pols, rnd):
    shuffled = list(pols)
    rnd.shuffle(shuffled)
    assert evaluate(conn, pols).allowed == evaluate(conn, shuffled).allowed


@PROPERTY
@given(conns, policy_sets, policies(dry_run=False))
def test_dry_run_policy_never_changes_the_verdict_but_predicts_enforcement(conn, pols, candidate):
    pols = [p for p in pols if p.key != candidate.key]
    trial = Authorization(
        candidate.name, candidate.namespace, candidate.scope, candidate.action, candidate.rules, dry_run=True
    )
    without = evaluate(conn, pols)
    with_trial = evaluate(conn, [*pols, trial])
    assert with_trial.allowed == without.allowed
    assert (trial.key in with_trial.dry_run_matched) == policy_matches(candidate, conn)
    # enforcing every dry-run policy (including the trial) gives the reported shadow verdict
    all_enforced = [
        Authorization(p.name, p.namespace, p.scope, p.action, p.rules, dry_run=False) for p in [*pols, trial]
    ]
    assert with_trial.dry_run_allowed == evaluate(conn, all_enforced).allowed


@PROPERTY
@given(conns, policy_sets, policies(action=Action.ALLOW, dry_run=False))
def test_another_allow_never_denies_once_an_allow_exists(conn, pols, extra):
    pols = [p for p in pols if p.key != extra.key]
    has_allow = any(p.action is Action.ALLOW and not p.dry_run for p in pols)
    before = evaluate(conn, pols)
    after = evaluate(conn, [*pols, extra])
    if has_allow and before.allowed:
        assert after.allowed


@PROPERTY
@given(conns, policy_sets)
def test_the_deciding_policy_really_matches(conn, pols):
    d = evaluate(conn, pols)
    if d.policy is not None:
        deciding = next(p for p in pols if p.key == d.policy)
        assert policy_matches(deciding, conn)
        assert deciding.action is (Action.ALLOW if d.allowed else Action.DENY)
    assert d.response_flags == ("-" if d.allowed else "DENY")


@PROPERTY
@given(st.text(max_size=8), st.text(max_size=8))
def test_istio_wildcards(value, candidate):
    assert StringMatch.from_istio("*").matches(candidate) is (candidate != "")
    if "*" in value:
        return
    assert StringMatch.from_istio(value).matches(candidate) is (candidate == value)
    if value:
        assert StringMatch.from_istio(value + "*").matches(candidate) is candidate.startswith(value)
        assert StringMatch.from_istio("*" + value).matches(candidate) is candidate.endswith(value)
