"""What a lab built, kept in a JSON state file so other processes can find it.

The file is the contract between `nodemesh lab up` and everything that later works in the lab (`status`,
`exec`, `down`, agents, the CA's placement source), so its keys are camelCase like the rest of the
user-facing config and are written atomically.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_DIR = Path(os.environ.get("NODEMESH_LAB_DIR", "/run/nodemesh/labs"))
PREFIX = "nm-"
LAB_NAME = re.compile(r"^[a-z0-9]{1,16}$")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _to_json(obj: Any) -> dict[str, Any]:
    return {_camel(k): v for k, v in asdict(obj).items()}


def _from_json(cls: type, data: dict[str, Any]) -> Any:
    known = set(cls.__dataclass_fields__)
    return cls(**{_snake(k): v for k, v in data.items() if _snake(k) in known})


def netns_path(netns: str) -> str:
    return f"/run/netns/{netns}"


def lab_prefix(name: str) -> str:
    """Every netns of lab `name` starts with this; lab names have no '-', so prefixes never nest."""
    return f"{PREFIX}{name}-"


@dataclass(frozen=True)
class NodeState:
    name: str
    netns: str
    fabric_ip: str
    pod_cidr: str
    gateway: str

    @property
    def netns_path(self) -> str:
        return netns_path(self.netns)


@dataclass(frozen=True)
class PodState:
    name: str
    namespace: str
    service_account: str
    node: str
    ip: str
    netns: str
    host_ifname: str
    gateway: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def netns_path(self) -> str:
        return netns_path(self.netns)

    @property
    def uid(self) -> str:
        return f"lab//v1/Pod/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServiceState:
    name: str
    namespace: str
    vip: str
    ports: list[dict[str, Any]]
    selector: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class LabState:
    name: str
    trust_domain: str
    fabric_netns: str
    fabric_cidr: str
    nodes: list[NodeState] = field(default_factory=list)
    pods: list[PodState] = field(default_factory=list)
    services: list[ServiceState] = field(default_factory=list)
    namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return lab_prefix(self.name)

    def all_netns(self) -> list[str]:
        return [self.fabric_netns] + [n.netns for n in self.nodes] + [p.netns for p in self.pods]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trustDomain": self.trust_domain,
            "fabricNetns": self.fabric_netns,
            "fabricCidr": self.fabric_cidr,
            "nodes": [_to_json(n) for n in self.nodes],
            "pods": [_to_json(p) for p in self.pods],
            "services": [_to_json(s) for s in self.services],
            "namespaces": self.namespaces,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        return cls(
            name=data["name"],
            trust_domain=data.get("trustDomain", "cluster.local"),
            fabric_netns=data["fabricNetns"],
            fabric_cidr=data.get("fabricCidr", ""),
            nodes=[_from_json(NodeState, n) for n in data.get("nodes", [])],
            pods=[_from_json(PodState, p) for p in data.get("pods", [])],
            services=[_from_json(ServiceState, s) for s in data.get("services", [])],
            namespaces=data.get("namespaces", {}),
        )


def state_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def save(state: LabState) -> Path:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = state_path(state.name)
    fd, tmp = tempfile.mkstemp(dir=STATE_DIR, prefix=f".{state.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(state.to_json(), f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def load(name: str) -> LabState:
    path = state_path(name)
    try:
        return LabState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise LookupError(f"no lab named {name!r} (no state file {path})") from None


def list_labs() -> list[str]:
    if not STATE_DIR.is_dir():
        return []
    return sorted(p.stem for p in STATE_DIR.glob("*.json") if LAB_NAME.match(p.stem))
