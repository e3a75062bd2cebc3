"""Whatever a config document holds, parsing ends in a config or a ConfigError, never another exception.

Documents are generated from the real key names so the parsers are driven deep into their structure.
"""

from __future__ import annotations

import json

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.config import ConfigError, parse_local_config, parse_policy_documents
from mesh.config.labstate import parse_lab_state

KEYS = [
    # local config
    "workloads",
    "services",
    "policies",
    "uid",
    "name",
    "namespace",
    "serviceAccount",
    "workloadIps",
    "protocol",
    "node",
    "waypoint",
    "destination",
    "hboneMtlsPort",
    "status",
    "labels",
    "netns",
    "vips",
    "ports",
    "scope",
    "action",
    "rules",
    "dryRun",
    "selector",
    "namespaces",
    "notPrincipals",
    "principals",
    "serviceAccounts",
    "sourceIps",
    "destinationPorts",
    "Exact",
    "Presence",
    "loadBalancer",
    "healthPolicy",
    # Istio
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    "from",
    "to",
    "when",
    "source",
    "operation",
    "key",
    "values",
    "notValues",
    "matchLabels",
    "targetRefs",
    "ipBlocks",
    "methods",
    "annotations",
    # lab
    "pods",
    "ip",
    "trustDomain",
    "targetPort",
    "port",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.sampled_from(
        [
            "",
            "*",
            "10.0.0.1",
            "10.0.0.0/8",
            "/10.0.0.1",
            "ns/host",
            "HBONE",
            "Allow",
            "Deny",
            "Namespace",
            "security.istio.io/v1",
            "AuthorizationPolicy",
            "ALLOW",
            "DENY",
            "CUSTOM",
            "source.ip",
            "x",
            "8080",
        ]
    ),
    st.text(max_size=6),
)
documents = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.integers(0, 90000)), children, max_size=5),
    ),
    max_leaves=25,
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _text(doc: object) -> str:
    return json.dumps(doc) if not isinstance(doc, dict) or all(isinstance(k, str) for k in doc) else yaml.safe_dump(doc)


@FUZZ
@given(documents)
def test_local_config_parser_only_raises_config_errors(doc):
    try:
        parse_local_config(_text(doc))
    except ConfigError as exc:
        assert str(exc)


@FUZZ
@given(st.dictionaries(st.sampled_from(["apiVersion", "kind", "metadata", "spec"]), documents, max_size=4))
def test_policy_parser_only_raises_config_errors(doc):
    doc = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p"}, **doc}
    try:
        parse_policy_documents(yaml.safe_dump(doc))
    except ConfigError as exc:
        assert str(exc)


@FUZZ
@given(documents)
def test_lab_state_parser_only_raises_config_errors(doc):
    try:
        parse_lab_state(_text(doc))
    except ConfigError as exc:
        assert str(exc)


leaf_lists = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))
sources = st.dictionaries(
    st.sampled_from(
        [
            "principals",
            "notNamespaces",
            "namespaces",
            "serviceAccounts",
            "ipBlocks",
            "notIpBlocks",
            "requestPrincipals",
            "remoteIpBlocks",
            "bogus",
        ]
    ),
    leaf_lists,
    max_size=3,
)
operations = st.dictionaries(
    st.sampled_from(["ports", "notPorts", "methods", "paths", "hosts", "bogus"]), leaf_lists, max_size=3
)
conditions = st.fixed_dictionaries(
    {"key": st.sampled_from(["source.ip", "destination.port", "source.principal", "request.headers[x]", "x", ""])},
    optional={"values": leaf_lists, "notValues": leaf_lists},
)
istio_rules = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(st.fixed_dictionaries({}, optional={"source": sources}), max_size=2),
        "to": st.lists(st.fixed_dictionaries({}, optional={"operation": operations}), max_size=2),
        "when": st.lists(conditions, max_size=2),
    },
)
specs = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(["ALLOW", "DENY", "AUDIT", "CUSTOM", "allow", 3]),
        "rules": st.one_of(st.none(), st.lists(istio_rules, max_size=3)),
        "selector": st.one_of(
            st.none(), st.fixed_dictionaries({"matchLabels": st.dictionaries(st.text(max_size=3), SCALARS, max_size=2)})
        ),
    },
)


@FUZZ
@given(specs)
def test_structured_policies_only_raise_config_errors(spec):
    doc = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p"}, "spec": spec}
    try:
        parse_policy_documents(yaml.safe_dump(doc))
    except ConfigError as exc:
        assert str(exc)


matches = st.dictionaries(
    st.sampled_from(
        [
            "namespaces",
            "notPrincipals",
            "serviceAccounts",
            "sourceIps",
            "destinationPorts",
            "notDestinationIps",
            "bogus",
        ]
    ),
    st.lists(
        st.one_of(
            SCALARS,
            st.dictionaries(
                st.sampled_from(["Exact", "Prefix", "Presence", "namespace", "serviceAccount"]), SCALARS, max_size=2
            ),
        ),
        max_size=3,
    ),
    max_size=3,
)
workloads = st.fixed_dictionaries(
    {"namespace": st.sampled_from(["default", "Bad", 1]), "workloadIps": st.lists(SCALARS, max_size=2)},
    optional={
        "name": SCALARS,
        "services": st.dictionaries(
            SCALARS.filter(lambda x: isinstance(x, str)),
            st.dictionaries(SCALARS.filter(lambda x: x is not None and not isinstance(x, bool)), SCALARS, max_size=2),
            max_size=2,
        ),
        "waypoint": st.fixed_dictionaries({"destination": SCALARS}),
        "protocol": SCALARS,
    },
)


@FUZZ
@given(st.lists(workloads, max_size=3), st.lists(st.lists(st.lists(matches, max_size=2), max_size=2), max_size=2))
def test_structured_local_config_only_raises_config_errors(wls, rules):
    doc = {
        "workloads": wls,
        "policies": [{"name": "p", "namespace": "ns", "scope": "Namespace", "action": "Deny", "rules": rules}],
    }
    try:
        parse_local_config(yaml.safe_dump(doc))
    except ConfigError as exc:
        assert str(exc)
