"""The agent's Kubernetes watch: one informer per mesh kind, pods limited to this node.

`KubeWatch` runs the informers for Namespaces, this node's Pods, Services, EndpointSlices,
AuthorizationPolicies and Gateways, and passes every add/update/delete to the handler registered for the
kind (or to a catch-all). Translating those objects into the mesh's config model happens in the handler:
this layer only guarantees the objects are current, complete and well-formed.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes_asyncio.client import Configuration

from agent.kube.backoff import Backoff
from agent.kube.cache import comparable
from agent.kube.client import KubeClient
from agent.kube.events import Handler, WatchEvent
from agent.kube.informer import Informer
from agent.kube.kinds import MESH_KINDS, Kind

# Server-assigned metadata left out of dumps: it differs between two servers holding the same objects.
DUMP_SKIP_META = ("resourceVersion", "managedFields", "uid", "creationTimestamp", "generation")


class KubeWatch:
    def __init__(self, configuration: Configuration | KubeClient, node_name: str | None,
                 handlers: Mapping[str, Handler] | None = None, default_handler: Handler | None = None, *,
                 kinds: Iterable[Kind] = MESH_KINDS, backoff: tuple[float, float] = (0.5, 30.0),
                 watch_timeout: tuple[int, int] = (300, 600)) -> None:
        """`handlers` maps a kind name ("Pod", "Service"...) to its handler; others go to `default_handler`.

        `node_name` limits Pods to this node (fieldSelector spec.nodeName), as a DaemonSet agent must;
        None watches every pod (for tools, not agents).
        """
        self._own_client = not isinstance(configuration, KubeClient)
        self.client = configuration if isinstance(configuration, KubeClient) else KubeClient(configuration)
        self.node_name = node_name
        self.handlers = dict(handlers or {})
        self.default_handler = default_handler
        self.informers: dict[str, Informer] = {}
        for kind in kinds:
            selector = f"spec.nodeName={node_name}" if kind.node_scoped and node_name else None
            self.informers[kind.name] = Informer(
                self.client, kind, self._dispatcher(kind.name), field_selector=selector,
                backoff=Backoff(initial=backoff[0], cap=backoff[1]), watch_timeout=watch_timeout)

    def _dispatcher(self, kind: str) -> Handler:
        async def dispatch(event: WatchEvent) -> None:
            handler = self.handlers.get(kind, self.default_handler)
            if handler is None:
                return
            result = handler(event)
            if asyncio.iscoroutine(result):
                await result

        return dispatch

    def start(self) -> None:
        for informer in self.informers.values():
            informer.start()

    async def stop(self) -> None:
        await asyncio.gather(*(i.stop() for i in self.informers.values()))
        if self._own_client:
            await self.client.close()

    async def __aenter__(self) -> KubeWatch:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Until every kind has been listed once (the agent's state is then complete)."""
        await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in self.informers.values())), timeout)

    @property
    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers.values())

    def objects(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        return self.informers[kind].cache.objects

    def dump(self) -> dict[str, dict[str, Any]]:
        """What the watch holds, by kind and key, without server-assigned metadata: equal dumps mean the
        agent sees the same cluster, whichever server (or incarnation of one) it came from."""
        return {name: {key: dump_object(obj) for key, obj in sorted(inf.cache.objects.items())}
                for name, inf in sorted(self.informers.items())}


def dump_object(obj: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(comparable(obj))
    meta = out.get("metadata")
    if isinstance(meta, dict):
        for k in DUMP_SKIP_META:
            meta.pop(k, None)
        refs = meta.get("ownerReferences")
        if isinstance(refs, list):
            meta["ownerReferences"] = [{k: v for k, v in r.items() if k != "uid"} if isinstance(r, dict) else r
                                       for r in refs]
    return out
