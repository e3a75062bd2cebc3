"""The agent's Kubernetes watch layer: list+watch informers for the kinds the mesh reads (see watch.py)."""

from agent.kube.backoff import Backoff
from agent.kube.cache import ObjectCache, Rejected
from agent.kube.client import ApiStatusError, KubeClient
from agent.kube.config import KubeConfigError, in_cluster_configuration, kubeconfig_configuration, load_configuration
from agent.kube.events import EventType, Handler, WatchEvent
from agent.kube.informer import Informer
from agent.kube.kinds import (
    AUTHORIZATION_POLICIES,
    ENDPOINTSLICES,
    GATEWAYS,
    MESH_KINDS,
    NAMESPACES,
    PODS,
    SERVICES,
    Kind,
)
from agent.kube.watch import KubeWatch, dump_object

__all__ = [
    "AUTHORIZATION_POLICIES",
    "ENDPOINTSLICES",
    "GATEWAYS",
    "MESH_KINDS",
    "NAMESPACES",
    "PODS",
    "SERVICES",
    "ApiStatusError",
    "Backoff",
    "EventType",
    "Handler",
    "Informer",
    "Kind",
    "KubeClient",
    "KubeConfigError",
    "KubeWatch",
    "ObjectCache",
    "Rejected",
    "WatchEvent",
    "dump_object",
    "in_cluster_configuration",
    "kubeconfig_configuration",
    "load_configuration",
]
