"""The lab's topology file: what a user writes to describe nodes, pods and services.

Validation is the point of this module: a topology is checked completely (names, CIDRs, address plan)
before anything is created, so a bad file fails with a message naming the field and leaves the machine
untouched.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DEFAULT_POD_CIDR = "10.244.0.0/16"
DEFAULT_FABRIC_CIDR = "172.30.0.0/24"
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"


class TopologyError(ValueError):
    """A topology file that cannot be built; the message names the offending field."""


def _dns_label(value: str, what: str) -> str:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise ValueError(f"{what} {value!r} is not a DNS label (lower-case letters, digits, '-', at most 63)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class PodSpec(_Strict):
    name: str
    namespace: str = "default"
    service_account: str = Field("default", alias="serviceAccount")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    ip: ipaddress.IPv4Address | None = None

    @field_validator("name", "namespace", "service_account")
    @classmethod
    def _names(cls, v: str) -> str:
        return _dns_label(v, "name")


class NodeSpec(_Strict):
    name: str
    pod_cidr: ipaddress.IPv4Network | None = Field(None, alias="podCidr")
    pods: list[PodSpec] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _dns_label(v, "node name")


class ServicePort(_Strict):
    port: int = Field(ge=1, le=65535)
    target_port: int | None = Field(None, alias="targetPort", ge=1, le=65535)
    name: str | None = None
    app_protocol: str | None = Field(None, alias="appProtocol")


class ServiceSpec(_Strict):
    """A ClusterIP Service: a virtual IP in front of the pods its selector matches."""

    name: str
    namespace: str = "default"
    vip: ipaddress.IPv4Address | None = None
    ports: list[ServicePort]
    selector: dict[str, str]
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name", "namespace")
    @classmethod
    def _names(cls, v: str) -> str:
        return _dns_label(v, "name")


class NamespaceSpec(_Strict):
    labels: dict[str, str] = Field(default_factory=dict)


class Topology(_Strict):
    """A whole lab: the fabric, nodes with their pods, optional services and namespace labels."""

    trust_domain: str = Field("cluster.local", alias="trustDomain")
    fabric_cidr: ipaddress.IPv4Network = Field(ipaddress.IPv4Network(DEFAULT_FABRIC_CIDR), alias="fabricCidr")
    pod_cidr: ipaddress.IPv4Network = Field(ipaddress.IPv4Network(DEFAULT_POD_CIDR), alias="podCidr")
    service_cidr: ipaddress.IPv4Network = Field(
        ipaddress.IPv4Network(DEFAULT_SERVICE_CIDR), alias="serviceCidr"
    )
    namespaces: dict[str, NamespaceSpec] = Field(default_factory=dict)
    nodes: list[NodeSpec] = Field(min_length=1)
    services: list[ServiceSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _address_plan(self) -> Topology:
        check_address_plan(self)
        return self

    def node_cidrs(self) -> list[ipaddress.IPv4Network]:
        """Each node's pod CIDR: as written, or the (i+1)-th /24 of the cluster pod CIDR."""
        out = []
        subnets = None
        for i, node in enumerate(self.nodes):
            if node.pod_cidr is not None:
                out.append(node.pod_cidr)
                continue
            if subnets is None:
                subnets = list(self.pod_cidr.subnets(new_prefix=max(24, self.pod_cidr.prefixlen)))
            if i + 1 >= len(subnets):
                raise ValueError(f"nodes[{i}]: podCidr {self.pod_cidr} has no /24 left for this node")
            out.append(subnets[i + 1])
        return out

    def pod_addresses(self) -> dict[str, ipaddress.IPv4Address]:
        """Pod name -> IP. Node gateways take the first host address, pods the following ones."""
        out: dict[str, ipaddress.IPv4Address] = {}
        for i, (node, cidr) in enumerate(zip(self.nodes, self.node_cidrs(), strict=True)):
            taken = {p.ip for p in node.pods if p.ip is not None}
            free = (h for h in list(cidr.hosts())[1:] if h not in taken)
            for j, pod in enumerate(node.pods):
                if pod.ip is not None:
                    out[pod.name] = pod.ip
                    continue
                ip = next(free, None)
                if ip is None:
                    raise ValueError(f"nodes[{i}].pods[{j}]: podCidr {cidr} has no address left")
                out[pod.name] = ip
        return out

    def service_addresses(self) -> dict[str, ipaddress.IPv4Address]:
        """'ns/name' -> VIP, assigned from the service CIDR when not written."""
        taken = {s.vip for s in self.services if s.vip is not None}
        free = (h for h in list(self.service_cidr.hosts())[9:] if h not in taken)
        out = {}
        for s in self.services:
            out[f"{s.namespace}/{s.name}"] = s.vip if s.vip is not None else next(free)
        return out


def check_address_plan(topo: Topology) -> None:
    """Names unique, CIDRs disjoint, every address inside its CIDR and used once."""
    seen_nodes: dict[str, int] = {}
    for i, node in enumerate(topo.nodes):
        if node.name in seen_nodes:
            first = seen_nodes[node.name]
            raise ValueError(f"nodes[{i}].name: duplicate node name {node.name!r} (also nodes[{first}])")
        seen_nodes[node.name] = i
    seen_pods: dict[str, str] = {}
    for i, node in enumerate(topo.nodes):
        for j, pod in enumerate(node.pods):
            if pod.name in seen_pods:
                raise ValueError(
                    f"nodes[{i}].pods[{j}].name: duplicate pod name {pod.name!r} (also on {seen_pods[pod.name]})"
                )
            seen_pods[pod.name] = node.name
    if topo.fabric_cidr.num_addresses - 2 < len(topo.nodes):
        raise ValueError(f"fabricCidr: {topo.fabric_cidr} has fewer addresses than there are nodes")
    cidrs = topo.node_cidrs()
    named = [("fabricCidr", topo.fabric_cidr), ("serviceCidr", topo.service_cidr)]
    named += [(f"nodes[{i}].podCidr", c) for i, c in enumerate(cidrs)]
    for a in range(len(named)):
        for b in range(a + 1, len(named)):
            if named[a][1].overlaps(named[b][1]):
                raise ValueError(f"{named[b][0]}: {named[b][1]} overlaps {named[a][0]} {named[a][1]}")
    for i, (node, cidr) in enumerate(zip(topo.nodes, cidrs, strict=True)):
        if cidr.prefixlen > 30:
            raise ValueError(f"nodes[{i}].podCidr: {cidr} is too small (at most /30)")
        gateway = next(cidr.hosts())
        for j, pod in enumerate(node.pods):
            if pod.ip is None:
                continue
            if pod.ip not in cidr or pod.ip in (gateway, cidr.network_address, cidr.broadcast_address):
                raise ValueError(f"nodes[{i}].pods[{j}].ip: {pod.ip} is not a free host address of {cidr}")
    addrs = topo.pod_addresses()
    if len(set(addrs.values())) != len(addrs):
        raise ValueError("pods: two pods were given the same ip")
    svc_seen: set[str] = set()
    for k, svc in enumerate(topo.services):
        key = f"{svc.namespace}/{svc.name}"
        if key in svc_seen:
            raise ValueError(f"services[{k}].name: duplicate service {key!r}")
        svc_seen.add(key)
        if svc.vip is not None and svc.vip not in topo.service_cidr:
            raise ValueError(f"services[{k}].vip: {svc.vip} is not in serviceCidr {topo.service_cidr}")
        if not svc.ports:
            raise ValueError(f"services[{k}].ports: at least one port is required")
    vips = list(topo.service_addresses().values())
    if len(set(vips)) != len(vips):
        raise ValueError("services: two services were given the same vip")


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ""
        for item in e["loc"]:
            loc += f"[{item}]" if isinstance(item, int) else (f".{item}" if loc else str(item))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_topology(source: str | Path | dict[str, Any]) -> Topology:
    """Parse and validate a topology from a dict, a YAML file path, or YAML text.

    Raises TopologyError with every problem found, each prefixed by the path of its field.
    """
    if isinstance(source, dict):
        data: Any = source
        origin = "topology"
    else:
        path = Path(source)
        is_path = isinstance(source, Path) or (len(str(source)) < 4096 and "\n" not in str(source))
        if is_path:
            try:
                text = path.read_text()
            except OSError as e:
                raise TopologyError(f"{source}: cannot read: {e.strerror}") from None
            origin = str(source)
        else:
            text, origin = str(source), "topology"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TopologyError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise TopologyError(f"{origin}: the top level must be a mapping with a 'nodes' list")
    try:
        return Topology.model_validate(data)
    except ValidationError as e:
        raise TopologyError(f"{origin}: {_format_error(e)}") from None
