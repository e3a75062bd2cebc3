"""ztunnel's local config format: what it accepts means the same here, and a bad file names its field."""

from __future__ import annotations

import ipaddress
import json

import pytest

from mesh.config import ConfigError, dump_local_config, parse_local_config
from mesh.config.model import (
    Action,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    NamespacedHostname,
    NetworkAddress,
    Protocol,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)

ZTUNNEL_EXAMPLE = """
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  services: {"default/example.com": {80: 8080}}
policies:
- name: deny-9999
  namespace: default
  scope: Namespace
  action: Allow
  dryRun: false
  rules: [[[{notDestinationPorts: [9999]}]]]
services:
- name: local
  namespace: default
  hostname: example.com
  vips: ["/127.10.0.1"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/local"]
  canonical: true
"""


def test_ztunnel_example_file():
    cfg = parse_local_config(ZTUNNEL_EXAMPLE)
    (w,) = cfg.workloads
    assert w.uid == "cluster1//v1/Pod/default/local"
    assert w.workload_ips == (ipaddress.ip_address("127.0.0.1"),)
    assert w.protocol is Protocol.HBONE
    assert w.identity == "spiffe://cluster.local/ns/default/sa/default"
    assert dict(w.services) == {"default/example.com": {80: 8080}}
    (p,) = cfg.policies
    assert (p.key, p.scope, p.action, p.dry_run) == ("default/deny-9999", Scope.NAMESPACE, Action.ALLOW, False)
    assert p.rules[0][0][0].not_destination_ports == (9999,)
    (s,) = cfg.services
    assert s.key == "default/example.com"
    assert s.vips == (NetworkAddress("", ipaddress.ip_address("127.10.0.1")),)
    assert dict(s.ports) == {80: 8080} and s.canonical


def test_json_and_yaml_give_the_same_config():
    cfg = parse_local_config(ZTUNNEL_EXAMPLE)
    assert parse_local_config(dump_local_config(cfg)) == cfg
    assert parse_local_config(dump_local_config(cfg).encode()) == cfg


def test_empty_file_is_an_empty_config():
    assert parse_local_config("") == parse_local_config("{}")
    assert parse_local_config("# nothing\n").workloads == ()


def test_every_workload_field_and_extensions():
    doc = {
        "workloads": [
            {
                "uid": "u1",
                "name": "w",
                "namespace": "ns",
                "serviceAccount": "sa",
                "trustDomain": "example.org",
                "workloadIps": ["10.0.0.5", "fd00::5"],
                "protocol": "hbone",
                "node": "node-a",
                "network": "net1",
                "clusterId": "c1",
                "hostname": "w.example",
                "canonicalName": "app",
                "canonicalRevision": "v2",
                "workloadName": "w-deploy",
                "workloadType": "deployment",
                "waypoint": {"destination": "ns/waypoint.ns.svc.cluster.local", "hboneMtlsPort": 15008},
                "networkGateway": {"destination": "net1/10.9.9.9", "hboneMtlsPort": 15009},
                "nativeTunnel": True,
                "applicationTunnel": {"protocol": "PROXY", "port": 15088},
                "authorizationPolicies": ["ns/p1"],
                "status": "UNHEALTHY",
                "networkMode": "HostNetwork",
                "locality": {"region": "r", "zone": "z", "subzone": "s"},
                "capacity": 3,
                "services": {"ns/svc.ns.svc.cluster.local": {"80": "8080"}},
                "labels": {"app": "w"},
                "netns": "nm-lab-pod1",
            }
        ]
    }
    (w,) = parse_local_config(json.dumps(doc)).workloads
    assert w.identity == "spiffe://example.org/ns/ns/sa/sa"
    assert w.protocol is Protocol.HBONE and w.status is HealthStatus.UNHEALTHY
    assert w.waypoint == GatewayAddress(NamespacedHostname("ns", "waypoint.ns.svc.cluster.local"), 15008)
    assert w.network_gateway == GatewayAddress(NetworkAddress("net1", ipaddress.ip_address("10.9.9.9")), 15009)
    assert w.application_tunnel.protocol == "PROXY" and w.application_tunnel.port == 15088
    assert dict(w.services) == {"ns/svc.ns.svc.cluster.local": {80: 8080}}
    assert dict(w.labels) == {"app": "w"}
    assert w.netns == "/run/netns/nm-lab-pod1"
    assert w.locality.zone == "z" and w.capacity == 3


def test_defaults_for_a_minimal_workload():
    (w,) = parse_local_config("workloads: [{name: a, namespace: ns, workloadIps: [10.1.1.1]}]").workloads
    assert w.uid == "local//v1/Pod/ns/a"
    assert w.protocol is Protocol.TCP and w.status is HealthStatus.HEALTHY
    assert w.identity == "spiffe://cluster.local/ns/ns/sa/default"
    assert w.netns is None and dict(w.labels) == {}


def test_native_policy_forms():
    text = """
policies:
- name: p
  namespace: ns
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  selector: {app: db}
  rules:
  - - - namespaces: [{Exact: prod}, {Prefix: dev-}, {Suffix: -test}, {Presence: []}, "lit*"]
        serviceAccounts: [{namespace: ns, serviceAccount: sa}, "other/sa2"]
        principals: ["spiffe://cluster.local/ns/ns/sa/x", "cluster.local/ns/ns/sa/y"]
        sourceIps: ["10.0.0.0/8", "10.1.2.3"]
        notDestinationIps: ["fd00::/8"]
        destinationPorts: [80, "443"]
"""
    (p,) = parse_local_config(text).policies
    assert p.dry_run and p.action is Action.DENY and dict(p.selector) == {"app": "db"}
    m = p.rules[0][0][0]
    assert m.namespaces == (
        StringMatch.exact("prod"),
        StringMatch.prefix("dev-"),
        StringMatch.suffix("-test"),
        StringMatch.presence(),
        StringMatch.prefix("lit"),
    )
    assert m.service_accounts == (ServiceAccountMatch("ns", "sa"), ServiceAccountMatch("other", "sa2"))
    # both spellings of a principal end up in Istio's form
    assert m.principals == (
        StringMatch.exact("cluster.local/ns/ns/sa/x"),
        StringMatch.exact("cluster.local/ns/ns/sa/y"),
    )
    assert [str(n) for n in m.source_ips] == ["10.0.0.0/8", "10.1.2.3/32"]
    assert m.destination_ports == (80, 443)


def test_service_fields():
    text = """
services:
- name: s
  namespace: ns
  hostname: s.ns.svc.cluster.local
  vips: ["/10.96.0.1", "net2/10.96.0.2"]
  ports: {80: 8080, 443: 8443}
  waypoint: {destination: "/10.0.0.9", hboneMtlsPort: 15008}
  loadBalancer: {routingPreferences: [Zone, Node], mode: Failover, healthPolicy: AllowAll}
  ipFamilies: IPv4
"""
    (s,) = parse_local_config(text).services
    assert [str(v) for v in s.vips] == ["/10.96.0.1", "net2/10.96.0.2"]
    assert s.load_balancer.health_policy is HealthPolicy.ALLOW_ALL
    assert s.accepts(HealthStatus.UNHEALTHY)
    assert s.waypoint.destination == NetworkAddress("", ipaddress.ip_address("10.0.0.9"))


POLICY = "policies: [{name: p, namespace: ns, scope: Namespace, action: Allow, rules: "

BAD = [
    (
        "workloads: [{name: a, namespace: ns, workloadIps: [x]}]",
        "workloads[0].workloadIps[0]",
        "'x' is not an IP address",
    ),
    (
        "workloads: [{name: a, namespace: ns, workloadIps: [10.0.0.1]},"
        " {name: b, namespace: ns, workloadIps: [10.0.0.2]},"
        " {name: c, namespace: ns, workloadIps: ['10.0.0.3', 'x']}]",
        "workloads[2].workloadIps[1]",
        "'x' is not an IP address",
    ),
    (
        "workloads: [{name: a, namespace: ns, workloadIps: [10.0.0.1], workloadIP: 1}]",
        "workloads[0].workloadIP",
        "unknown field",
    ),
    ("workloads: [{name: a, workloadIps: [10.0.0.1]}]", "workloads[0].namespace", "required field is missing"),
    (
        "workloads: [{name: a, namespace: ns, workloadIps: [10.0.0.1], protocol: QUIC}]",
        "workloads[0].protocol",
        "'QUIC'",
    ),
    ("workloads: [{name: a, namespace: 7, workloadIps: [10.0.0.1]}]", "workloads[0].namespace", "valid string"),
    (
        "workloads: [{name: a, namespace: ns, workloadIps: [10.0.0.1], services: {nohost: {80: 80}}}]",
        'workloads[0].services["nohost"]',
        "not a namespaced hostname",
    ),
    (
        "workloads: [{name: a, namespace: ns, workloadIps: [10.0.0.1], services: {a/b: {80: 70000}}}]",
        'workloads[0].services["a/b"][80]',
        "70000 is not a port number",
    ),
    ("workloads: [{namespace: ns, workloadIps: [10.0.0.1]}]", "workloads[0]", "needs a uid or a name"),
    ("workloads: [{name: a, namespace: Prod_1, workloadIps: [10.0.0.1]}]", "workloads[0].namespace", "not a valid"),
    (
        "workloads: [{name: a, namespace: ns, serviceAccount: 'my sa', workloadIps: [10.0.0.1]}]",
        "workloads[0].serviceAccount",
        "not a valid service account",
    ),
    (
        "workloads: [{name: a, namespace: ns, trustDomain: 'td:443', workloadIps: [10.0.0.1]}]",
        "workloads[0].trustDomain",
        "not a valid trust domain",
    ),
    (
        "workloads: [{name: a, namespace: ns, workloadIps: [10.0.0.1]},"
        " {name: a, namespace: ns, workloadIps: [10.0.0.2]}]",
        "workloads[1]",
        "duplicate workload uid",
    ),
    (
        "workloads: [{name: a, namespace: ns, workloadIps: [1.2.3.4], waypoint: {destination: nope}}]",
        "workloads[0].waypoint.destination",
        "not a gateway destination",
    ),
    ("services: [{name: s, namespace: ns, hostname: h, vips: [10.0.0.1]}]", "services[0].vips[0]", "'<network>/<ip>'"),
    ("services: [{name: s, namespace: ns, hostname: h, ports: {http: 80}}]", 'services[0].ports["http"]', "not a port"),
    ("services: [{name: s, namespace: ns, hostname: h, cidrVips: []}]", "services[0].cidrVips", "unknown field"),
    ("policies: [{name: p, namespace: ns, scope: Cluster, action: Allow}]", "policies[0].scope", "not a valid scope"),
    (
        "policies: [{name: p, namespace: ns, scope: Namespace, action: Audit}]",
        "policies[0].action",
        "not a valid action",
    ),
    (
        POLICY + "[[[{destinationPort: [80]}]]]}]",
        "policies[0].rules[0][0][0].destinationPort",
        "unknown field",
    ),
    (
        POLICY + "[[[{sourceIps: [10.0.0.0/33]}]]]}]",
        "policies[0].rules[0][0][0].sourceIps[0]",
        "not an IP address or CIDR",
    ),
    (
        POLICY + "[[[{namespaces: [{Regex: x}]}]]]}]",
        "policies[0].rules[0][0][0].namespaces[0]",
        "not a string match",
    ),
    (
        POLICY + "[[[{serviceAccounts: [justname]}]]]}]",
        "policies[0].rules[0][0][0].serviceAccounts[0]",
        "not a service account match",
    ),
    (
        "policies: [{name: p, namespace: ns, scope: Namespace, action: Allow, selector: {a: b}}]",
        "policies[0].selector",
        "only a WorkloadSelector policy",
    ),
    (
        "policies: [{name: p, namespace: ns, scope: Global, action: Deny}, {name: p, namespace: ns, scope: Global, "
        "action: Allow}]",
        "policies[1]",
        "duplicate policy",
    ),
    ("workload: []", "workload", "unknown field"),
    ("- a\n- b\n", "", "must be a mapping"),
    ("workloads: [\n", "", "not valid YAML/JSON at line 2"),
]


@pytest.mark.parametrize(("text", "path", "message"), BAD, ids=[b[1] or b[2] for b in BAD])
def test_bad_files_name_the_field(text, path, message):
    with pytest.raises(ConfigError) as info:
        parse_local_config(text)
    err = info.value
    assert err.path == path
    assert message in err.message
    if path:
        assert str(err).startswith(f"{path}: ")


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_local_config("workloads: [{name: a, namespace: ns, workloadIps: [x, y]}]")
    assert [p for p, _ in info.value.problems] == ["workloads[0].workloadIps[0]", "workloads[0].workloadIps[1]"]
    assert str(info.value).startswith("2 problems: ")


def test_non_utf8_file_is_refused_clearly():
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_local_config(b"\xff\xfe workloads")
