"""A multi-node 'cluster' built from network namespaces on one machine: see docs/lab.md."""

from mesh.lab.build import Lab, LabError, destroy_prefix, down_all, plan
from mesh.lab.state import LabState, NodeState, PodState, ServiceState, list_labs
from mesh.lab.topology import Topology, TopologyError, load_topology

__all__ = [
    "Lab",
    "LabError",
    "LabState",
    "NodeState",
    "PodState",
    "ServiceState",
    "Topology",
    "TopologyError",
    "destroy_prefix",
    "down_all",
    "list_labs",
    "load_topology",
    "plan",
]
