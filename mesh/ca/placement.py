"""Which identities have a pod on which node: the fact the CA authorises every signing request with.

The CA must learn placement from the same source the agents configure themselves from, so a node can never
obtain a certificate for a pod that is not scheduled on it. Sources are read fresh: a file is re-parsed
whenever its modification time, size or inode changes, so pods added later are seen without a restart.
An unreadable or invalid source raises :class:`PlacementError` and the CA refuses to sign (fail closed).

Sources here:

* ``lab:NAME`` -- the lab's state file (``pods[].{namespace, serviceAccount, node}``, ``trustDomain``);
* ``file:PATH`` -- YAML or JSON, either ``{"nodes": {"node-a": ["spiffe://...", ...]}}`` or a ztunnel
  local config (``workloads[]`` with ``node``, ``namespace``, ``serviceAccount``, ``trustDomain``);
* :class:`MemoryPlacement` -- in-process, for tests and benchmarks.

The Kubernetes source (pods by ``spec.nodeName``) plugs into the same protocol.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml

from mesh.identity import IdentityError, SpiffeId
from mesh.identity.spiffe import DEFAULT_TRUST_DOMAIN


class PlacementError(Exception):
    """The placement source cannot be read or is invalid; the CA must deny rather than guess."""


@runtime_checkable
class PlacementSource(Protocol):
    def identities_on_node(self, node: str) -> set[SpiffeId]:
        """The identities of the pods currently on ``node`` (empty for an unknown node)."""
        ...

    def describe(self) -> str:
        """A short human description for logs (``lab:demo``, ``file:/etc/...``)."""
        ...


class MemoryPlacement:
    """A mutable in-process map node -> identities (tests and benchmarks)."""

    def __init__(self, nodes: Mapping[str, Iterable[SpiffeId | str]] | None = None) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, set[SpiffeId]] = {}
        for node, ids in (nodes or {}).items():
            for sid in ids:
                self.add(node, sid)

    def add(self, node: str, identity: SpiffeId | str) -> None:
        sid = identity if isinstance(identity, SpiffeId) else SpiffeId.parse(identity)
        with self._lock:
            self._nodes.setdefault(node, set()).add(sid)

    def remove(self, node: str, identity: SpiffeId | str) -> None:
        sid = identity if isinstance(identity, SpiffeId) else SpiffeId.parse(identity)
        with self._lock:
            self._nodes.get(node, set()).discard(sid)

    def identities_on_node(self, node: str) -> set[SpiffeId]:
        with self._lock:
            return set(self._nodes.get(node, set()))

    def describe(self) -> str:
        return "memory"


class _WatchedFile:
    """Parses a file again only when it changed; keeps the last good parse per (mtime, size, inode)."""

    def __init__(self, path: Path, parse: Callable[[bytes], dict[str, set[SpiffeId]]]) -> None:
        self.path = path
        self._parse = parse
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._nodes: dict[str, set[SpiffeId]] = {}

    def nodes(self) -> dict[str, set[SpiffeId]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise PlacementError(f"placement source {self.path} does not exist") from None
        except OSError as exc:
            raise PlacementError(f"placement source {self.path} cannot be read: {exc.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if stamp != self._stamp:
                try:
                    data = self.path.read_bytes()
                except OSError as exc:
                    raise PlacementError(f"placement source {self.path} cannot be read: {exc.strerror}") from None
                self._nodes = self._parse(data)  # raises PlacementError; the old parse is not reused then
                self._stamp = stamp
            return self._nodes


def _add(nodes: dict[str, set[SpiffeId]], node: object, sid: SpiffeId, where: str) -> None:
    if not isinstance(node, str) or not node:
        raise PlacementError(f"{where}: node must be a non-empty string")
    nodes.setdefault(node, set()).add(sid)


def parse_lab_state(data: bytes, where: str = "lab state") -> dict[str, set[SpiffeId]]:
    """``pods[].{namespace, serviceAccount, node}`` of the lab state file, in its ``trustDomain``."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlacementError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("pods", []), list):
        raise PlacementError(f"{where}: expected an object with a 'pods' list")
    trust_domain = doc.get("trustDomain") or DEFAULT_TRUST_DOMAIN
    nodes: dict[str, set[SpiffeId]] = {}
    for i, pod in enumerate(doc.get("pods", [])):
        at = f"{where}: pods[{i}]"
        if not isinstance(pod, dict):
            raise PlacementError(f"{at} is not an object")
        try:
            sid = SpiffeId(trust_domain, pod.get("namespace"), pod.get("serviceAccount") or "default")
        except IdentityError as exc:
            raise PlacementError(f"{at}: {exc}") from None
        _add(nodes, pod.get("node"), sid, f"{at}.node")
    return nodes


def parse_placement_document(data: bytes, default_trust_domain: str = DEFAULT_TRUST_DOMAIN,
                             where: str = "placement file") -> dict[str, set[SpiffeId]]:
    """A static placement file: the ``nodes`` map, or a ztunnel local config's ``workloads``."""
    try:
        doc: Any = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise PlacementError(f"{where} is not valid YAML/JSON: {exc}") from None
    if not isinstance(doc, dict) or not ({"nodes", "workloads"} & doc.keys()):
        raise PlacementError(f"{where}: expected a mapping with 'nodes' (node -> SPIFFE IDs) or 'workloads'")
    if "nodes" in doc:
        return _parse_nodes_map(doc["nodes"], where)
    return _parse_local_config(data, default_trust_domain, where)


def _parse_nodes_map(raw: object, where: str) -> dict[str, set[SpiffeId]]:
    if not isinstance(raw, dict):
        raise PlacementError(f"{where}: 'nodes' must map node names to lists of SPIFFE IDs")
    nodes: dict[str, set[SpiffeId]] = {}
    for node, ids in raw.items():
        if not isinstance(ids, list):
            raise PlacementError(f"{where}: nodes.{node} must be a list of SPIFFE IDs")
        nodes.setdefault(str(node), set())
        for i, uri in enumerate(ids):
            try:
                sid = SpiffeId.parse(uri)
            except IdentityError as exc:
                raise PlacementError(f"{where}: nodes.{node}[{i}]: {exc}") from None
            _add(nodes, node, sid, f"{where}: nodes.{node}")
    return nodes


def _parse_local_config(data: bytes, default_trust_domain: str, where: str) -> dict[str, set[SpiffeId]]:
    from mesh.config.errors import ConfigError
    from mesh.config.localconfig import parse_local_config

    try:
        config = parse_local_config(data)
    except ConfigError as exc:
        raise PlacementError(f"{where}: {exc}") from None
    nodes: dict[str, set[SpiffeId]] = {}
    for i, wl in enumerate(config.workloads):
        if not wl.node:
            continue  # a workload on no node (e.g. a VM or remote pod) gives no node a right to sign for it
        try:
            sid = SpiffeId(wl.trust_domain or default_trust_domain, wl.namespace, wl.service_account)
        except IdentityError as exc:
            raise PlacementError(f"{where}: workloads[{i}]: {exc}") from None
        _add(nodes, wl.node, sid, f"{where}: workloads[{i}].node")
    return nodes


class FilePlacement:
    """``file:PATH``: a static YAML/JSON placement file, re-read when it changes."""

    def __init__(self, path: str | Path, default_trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self.path = Path(path)
        self._file = _WatchedFile(self.path, lambda d: parse_placement_document(d, default_trust_domain,
                                                                               f"placement file {self.path}"))

    def identities_on_node(self, node: str) -> set[SpiffeId]:
        return set(self._file.nodes().get(node, set()))

    def describe(self) -> str:
        return f"file:{self.path}"


class LabPlacement:
    """``lab:NAME``: the pods of a lab, from its state file (written by ``nodemesh lab up``)."""

    def __init__(self, name: str | None = None, path: str | Path | None = None) -> None:
        if path is None:
            if not name:
                raise PlacementError("lab placement needs a lab name")
            from mesh.lab.state import state_path

            path = state_path(name)
        self.name = name or Path(path).stem
        self.path = Path(path)
        self._file = _WatchedFile(self.path, lambda d: parse_lab_state(d, f"lab state {self.path}"))

    def identities_on_node(self, node: str) -> set[SpiffeId]:
        return set(self._file.nodes().get(node, set()))

    def describe(self) -> str:
        return f"lab:{self.name}"


def placement_from_spec(spec: str, default_trust_domain: str = DEFAULT_TRUST_DOMAIN) -> PlacementSource:
    """Parse the ``--placement`` option: ``lab:NAME`` or ``file:PATH``."""
    kind, sep, arg = (spec or "").partition(":")
    if not sep or not arg:
        raise PlacementError(f"--placement {spec!r}: expected lab:NAME or file:PATH")
    if kind == "lab":
        return LabPlacement(arg)
    if kind == "file":
        return FilePlacement(arg, default_trust_domain)
    raise PlacementError(f"--placement {spec!r}: unknown source {kind!r} (use lab:NAME or file:PATH)")
