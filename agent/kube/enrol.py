"""Enrolment in Kubernetes mode: which of this node's pods the agent captures, and in which namespace.

Two ways a pod comes to be captured, as with istio-cni:

- **Running pods** (those that were there before the agent, or are enrolled later by a label): the
  watch's model says the pod is on this node and enrolled (`translate.captured`); its namespace is found
  from the host's /proc by its IP (`podnetns.NetnsFinder`).
- **New pods**: the chained CNI plugin announces the sandbox (namespace path, addresses) before any
  container runs, and waits. The pod is not `Running` yet, so the model does not hold it; enrolment
  translates the pod as it will be (the addresses from the CNI result) with the same rules, and keeps it
  as *pending* until the API server reports it running, so a reconcile in between does not drop it.

Whether a pod is enrolled is decided in one place for both paths: the translation's rules (the pod's
`istio.io/dataplane-mode` label wins, `none` opts out, then the namespace's label; a sidecar or the host
network never enrols), applied to the objects the watch holds. The redirection annotation follows what
the agent actually captured (`annotate`).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from agent.kube.annotate import PodApi, has_annotation, pod_path
from agent.kube.podnetns import NetnsFinder, NetnsNotFound
from agent.kube.source import KubeSource
from agent.kube.translate import TUNNEL_LABEL, captured, translate
from mesh.config.labstate import DATAPLANE_MODE, SIDECAR_STATUS
from mesh.config.model import Workload

log = logging.getLogger("nodemesh.kube.enrol")

TERMINAL_PHASES = ("Succeeded", "Failed")
# How long a CNI-announced pod is kept while the watch has not delivered it yet.
PENDING_GRACE = 60.0


class EnrolmentError(Exception):
    """A pod announced by the CNI plugin cannot be decided on; the message says why."""


class EnrolmentNotReady(EnrolmentError):
    """The agent's view of the cluster is not complete yet: ask again later."""


def not_enrolled_reason(pod: Mapping[str, Any], namespace_labels: Mapping[str, str]) -> str:
    """Why a pod is not captured, in the user's terms ('' when it is enrolled). Sans-IO."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    if (pod.get("spec") or {}).get("hostNetwork") is True:
        return "uses the host network"
    if SIDECAR_STATUS in annotations:
        return f"has an injected sidecar ({SIDECAR_STATUS})"
    if labels.get(TUNNEL_LABEL) == "http":
        return f"speaks HBONE itself ({TUNNEL_LABEL}=http)"
    mode = labels.get(DATAPLANE_MODE)
    if mode == "none":
        return f"opted out ({DATAPLANE_MODE}=none on the pod)"
    if mode == "ambient" or namespace_labels.get(DATAPLANE_MODE) == "ambient":
        return ""
    return f"neither the pod nor its namespace is labelled {DATAPLANE_MODE}=ambient"


def as_running(pod: Mapping[str, Any], ips: Iterable[str]) -> dict[str, Any]:
    """The pod as the API server will report it once kubelet has started it: Running, with the addresses
    the CNI result gave it. Sans-IO."""
    out = copy.deepcopy(dict(pod))
    addresses = list(ips)
    status = dict(out.get("status") or {})
    status["phase"] = "Running"
    if addresses:
        status["podIP"] = addresses[0]
        status["podIPs"] = [{"ip": ip} for ip in addresses]
    out["status"] = status
    return out


@dataclass
class PendingPod:
    """A pod the CNI plugin announced, captured before the API server reports it running."""

    key: str  # namespace/name
    pod_uid: str  # metadata.uid, so a re-created pod of the same name is another pod
    workload: Workload
    netns: str
    container_id: str
    since: float = dataclasses.field(default_factory=time.monotonic)
    seen: bool = False  # the watch has shown it: once gone from the watch, it was deleted


@dataclass(frozen=True)
class Wanted:
    """A pod to capture; `netns` is empty when it still has to be found (only needed to install)."""

    workload: Workload
    netns: str = ""


class KubeEnrolment:
    def __init__(self, source: KubeSource, finder: NetnsFinder, api: PodApi, node: str) -> None:
        self.source = source
        self.finder = finder
        self.api = api
        self.node = node
        self.pending: dict[str, PendingPod] = {}  # by workload uid
        self.unresolved: dict[str, str] = {}  # workload uid -> why its namespace was not found

    # --- the watch's objects --------------------------------------------------------------------------

    def _cache(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        informer = self.source.watch.informers.get(kind)
        return informer.cache.objects if informer is not None else {}

    def raw_pod(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self._cache("Pod").get(f"{namespace}/{name}")

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        ns = self._cache("Namespace").get(namespace) or {}
        return (ns.get("metadata") or {}).get("labels") or {}

    def local_raw_pods(self) -> list[Mapping[str, Any]]:
        return [p for p in self._cache("Pod").values() if (p.get("spec") or {}).get("nodeName") == self.node]

    def workload_uid(self, namespace: str, name: str) -> str:
        return f"{self.source.options.cluster_id}//Pod/{namespace}/{name}"

    def workload_of(self, pod: Mapping[str, Any], ips: Iterable[str],
                    namespace: Mapping[str, Any] | None = None) -> tuple[Workload | None, str]:
        """The workload the model will hold for `pod` once it runs with `ips`, by the model's own rules
        (`namespace`: a fresher copy of the pod's namespace than the watch's); else None and why."""
        objects: dict[str, Any] = {kind: self._cache(kind) for kind in ("Namespace", "Service", "EndpointSlice",
                                                                        "Gateway")}
        meta = pod.get("metadata") or {}
        if namespace is not None:
            objects["Namespace"] = {**objects["Namespace"], str(meta.get("namespace")): namespace}
        objects["Pod"] = {f"{meta.get('namespace')}/{meta.get('name')}": as_running(pod, ips)}
        translation = translate(objects, self.source.options)
        if translation.config.workloads:
            return translation.config.workloads[0], ""
        return None, "; ".join(str(s) for s in translation.skipped if s.kind == "Pod") or "no usable address"

    # --- new pods, from the CNI plugin ------------------------------------------------------------------

    async def _read(self, path: str, cached: Mapping[str, Any] | None, uid: str, deadline: float,
                    what: str) -> Mapping[str, Any]:
        """An object straight from the API server (the watch may lag behind kubelet, and a label set a
        moment ago must count), retried while it is not there yet; the watch's copy if the server cannot
        be reached at all."""
        delay = 0.1
        while True:
            status, body = await self.api.get(path)
            if status == 200 and isinstance(body, Mapping) and \
                    (not uid or (body.get("metadata") or {}).get("uid") == uid):
                return body
            if status == 0 and cached is not None and (not uid or (cached.get("metadata") or {}).get("uid") == uid):
                log.warning("%s: API server unreachable (%s); deciding from the watch's copy", what,
                            body.get("message") if isinstance(body, Mapping) else body)
                return cached
            if time.monotonic() + delay > deadline:
                cause = f"HTTP {status}" if status else (body.get("message") if isinstance(body, Mapping) else "")
                raise EnrolmentError(f"{what}{' uid ' + uid if uid else ''} cannot be read from the API server "
                                     f"({cause})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def fetch(self, namespace: str, name: str, pod_uid: str,
                    deadline: float) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
        """(the pod, its namespace) as the API server has them now."""
        pod = await self._read(pod_path(namespace, name), self.raw_pod(namespace, name), pod_uid, deadline,
                               f"pod {namespace}/{name}")
        ns = await self._read(f"/api/v1/namespaces/{quote(namespace, safe='')}",
                              self._cache("Namespace").get(namespace), "", deadline, f"namespace {namespace}")
        return pod, ns

    def decide(self, pod: Mapping[str, Any], ips: Iterable[str],
               namespace: Mapping[str, Any] | None = None) -> tuple[Workload | None, str]:
        """(the workload to capture, '') or (None, why not)."""
        if not self.source.published:
            raise EnrolmentNotReady("the agent has not listed the cluster yet")
        meta = pod.get("metadata") or {}
        node = (pod.get("spec") or {}).get("nodeName")
        if node and node != self.node:
            raise EnrolmentError(f"pod {meta.get('namespace')}/{meta.get('name')} is scheduled on {node}, "
                                 f"not on this node ({self.node})")
        ns_labels = ((namespace.get("metadata") or {}).get("labels") or {}) if namespace is not None \
            else self.namespace_labels(str(meta.get("namespace") or ""))
        reason = not_enrolled_reason(pod, ns_labels)
        if reason:
            return None, reason
        workload, why = self.workload_of(pod, ips, namespace)
        if workload is None:
            raise EnrolmentError(f"pod {meta.get('namespace')}/{meta.get('name')} cannot be translated: {why}")
        if not captured(workload):
            return None, "not captured by the mesh's rules"
        return workload, ""

    def add_pending(self, pod: Mapping[str, Any], workload: Workload, netns: str, container_id: str) -> None:
        meta = pod.get("metadata") or {}
        self.pending[workload.uid] = PendingPod(f"{meta.get('namespace')}/{meta.get('name')}",
                                                str(meta.get("uid") or ""), workload, netns, container_id)

    def drop_pending(self, uid: str) -> PendingPod | None:
        return self.pending.pop(uid, None)

    # --- what to capture now ----------------------------------------------------------------------------

    def plan(self, model_workloads: Iterable[Workload], have: set[str]) -> dict[str, Wanted]:
        """On the event loop: the pods to capture, from the model and the still-pending CNI pods
        (`have`: the ones captured already).

        A pending pod is kept as the CNI ADD decided until the model holds it (the API server reports it
        running), and the model decides from then on. It is not re-decided from the watch's copies in
        between: those may be older than what the ADD read from the API server.
        """
        model = {w.uid: w for w in model_workloads if w.node == self.node}
        want: dict[str, Wanted] = {}
        for uid, w in model.items():
            if captured(w) and w.workload_ips:
                pending = self.pending.get(uid)
                want[uid] = Wanted(w, pending.netns if pending is not None else "")
        now = time.monotonic()
        for uid, pending in list(self.pending.items()):
            if uid in model:
                if uid not in want or uid in have:
                    del self.pending[uid]  # the model has the last word now
                continue
            namespace, _, name = pending.key.partition("/")
            pod = self.raw_pod(namespace, name)
            if pod is None:
                if pending.seen or now - pending.since > PENDING_GRACE:
                    del self.pending[uid]  # deleted, or never seen by the watch: the sandbox was abandoned
                else:
                    want[uid] = Wanted(pending.workload, pending.netns)
                continue
            pending.seen = True
            meta = pod.get("metadata") or {}
            phase = (pod.get("status") or {}).get("phase")
            if (pending.pod_uid and meta.get("uid") != pending.pod_uid) or phase in TERMINAL_PHASES \
                    or meta.get("deletionTimestamp"):
                del self.pending[uid]
                continue
            want[uid] = Wanted(pending.workload, pending.netns)
        return want

    def resolve(self, want: dict[str, Wanted], have: set[str]) -> dict[str, Workload]:
        """In a worker thread: each pod to install gets its namespace path; those without one are left
        out (and recorded in `unresolved`) until a later reconcile finds them."""
        out: dict[str, Workload] = {}
        unresolved: dict[str, str] = {}
        for uid, item in want.items():
            w = item.workload
            if uid in have:
                out[uid] = w
                continue
            netns = item.netns
            if not netns:
                try:
                    netns = self.finder.find(w.workload_ips[0]).path
                except NetnsNotFound as err:
                    unresolved[uid] = str(err)
                    continue
            out[uid] = dataclasses.replace(w, netns=netns)
        self.unresolved = unresolved
        return out

    def annotation_changes(self, captured_uids: set[str]) -> list[tuple[str, str, bool]]:
        """On the loop: (namespace, name, enabled) for each local pod whose annotation disagrees with what
        the agent captured."""
        changes = []
        for pod in self.local_raw_pods():
            meta = pod.get("metadata") or {}
            ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
            if meta.get("deletionTimestamp"):
                continue
            enabled = self.workload_uid(ns, name) in captured_uids
            if has_annotation(pod) != enabled:
                changes.append((ns, name, enabled))
        return changes
