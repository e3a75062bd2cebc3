"""The topology file: every bad input is refused with the field named, and the address plan is sound."""

from __future__ import annotations

import ipaddress

import pytest

from mesh.lab import TopologyError, load_topology, plan


def topo(**extra):
    base = {
        "nodes": [
            {"name": "node-a", "pods": [{"name": "client", "serviceAccount": "sleep"}]},
            {"name": "node-b", "pods": [{"name": "server", "serviceAccount": "httpbin"}]},
        ]
    }
    base.update(extra)
    return base


def test_defaults_give_each_node_a_24_and_pods_addresses_after_the_gateway():
    t = load_topology(topo())
    state = plan(t, "x")
    a, b = state.nodes
    assert (a.pod_cidr, a.gateway) == ("10.244.1.0/24", "10.244.1.1")
    assert (b.pod_cidr, b.gateway) == ("10.244.2.0/24", "10.244.2.1")
    pods = {p.name: p for p in state.pods}
    assert pods["client"].ip == "10.244.1.2" and pods["client"].node == "node-a"
    assert pods["server"].ip == "10.244.2.2" and pods["server"].gateway == "10.244.2.1"
    assert pods["client"].namespace == "default"
    assert a.fabric_ip != b.fabric_ip
    assert all(n.startswith("nm-x-") for n in state.all_netns())


def test_explicit_addresses_are_kept_and_automatic_ones_skip_them():
    t = load_topology(
        {"nodes": [{"name": "n1", "podCidr": "10.10.0.0/24",
                    "pods": [{"name": "a"}, {"name": "b", "ip": "10.10.0.2"}]}]}
    )
    ips = t.pod_addresses()
    assert ips["b"] == ipaddress.IPv4Address("10.10.0.2")
    assert ips["a"] == ipaddress.IPv4Address("10.10.0.3")


def test_yaml_text_and_file_both_load(tmp_path):
    text = "nodes:\n  - name: node-a\n    pods:\n      - {name: client}\n"
    assert load_topology(text).nodes[0].pods[0].name == "client"
    f = tmp_path / "t.yaml"
    f.write_text(text)
    assert load_topology(f).nodes[0].name == "node-a"


def test_services_get_vips_from_the_service_cidr():
    t = load_topology(topo(services=[{"name": "server", "ports": [{"port": 80, "targetPort": 8080}],
                                      "selector": {"app": "server"}}]))
    state = plan(t, "x")
    (svc,) = state.services
    assert ipaddress.IPv4Address(svc.vip) in ipaddress.IPv4Network("10.96.0.0/16")
    assert svc.ports == [{"port": 80, "targetPort": 8080}]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (topo(nodes=[{"name": "a", "pods": [{"name": "p"}]}, {"name": "b", "pods": [{"name": "p"}]}]),
         "nodes[1].pods[0].name: duplicate pod name 'p'"),
        (topo(nodes=[{"name": "a"}, {"name": "a"}]), "nodes[1].name: duplicate node name 'a'"),
        (topo(nodes=[{"name": "a", "pods": [{"name": "p", "colour": "red"}]}]),
         "nodes[0].pods[0].colour: unknown field"),
        (topo(extra_top=1), "extra_top: unknown field"),
        (topo(nodes=[{"name": "a", "podCidr": "10.1.2.300/24"}]), "nodes[0].podCidr"),
        (topo(podCidr="not-a-cidr"), "podCidr"),
        (topo(nodes=[{"name": "a", "podCidr": "10.1.0.0/24"}, {"name": "b", "podCidr": "10.1.0.128/25"}]),
         "nodes[1].podCidr: 10.1.0.128/25 overlaps nodes[0].podCidr"),
        (topo(fabricCidr="10.244.1.0/28"), "overlaps fabricCidr"),
        (topo(nodes=[{"name": "a", "podCidr": "10.1.0.0/24", "pods": [{"name": "p", "ip": "10.2.0.5"}]}]),
         "nodes[0].pods[0].ip: 10.2.0.5 is not a free host address"),
        (topo(nodes=[{"name": "a", "podCidr": "10.1.0.0/24", "pods": [{"name": "p", "ip": "10.1.0.1"}]}]),
         "is not a free host address"),
        (topo(nodes=[{"name": "Node_A"}]), "nodes[0].name: node name 'Node_A' is not a DNS label"),
        (topo(nodes=[]), "nodes: List should have at least 1 item"),
        (topo(nodes=[{"name": "a", "podCidr": "10.1.0.0/30", "pods": [{"name": "p"}, {"name": "q"}]}]),
         "has no address left"),
        (topo(services=[{"name": "s", "ports": [{"port": 70000}], "selector": {}}]), "services[0].ports[0].port"),
        (topo(services=[{"name": "s", "vip": "10.244.1.9", "ports": [{"port": 80}], "selector": {}}]),
         "services[0].vip: 10.244.1.9 is not in serviceCidr"),
    ],
)
def test_invalid_topologies_name_the_problem(data, needle):
    with pytest.raises(TopologyError) as e:
        load_topology(data)
    assert needle in str(e.value)


def test_non_mapping_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(TopologyError, match="top level must be a mapping"):
        load_topology("- just\n- a list\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load_topology("nodes: [\n  {name: a\n")
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "missing.yaml")
