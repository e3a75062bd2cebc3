"""A test double of the Kubernetes API server for the netns lab and the test suite (never a control plane).

It speaks the real wire protocol to real clients (kubectl, kubernetes-asyncio): see `server.ApiServer` for
what it keeps and what it leaves out, and docs/kubernetes-lab.md for how the lab uses it.
"""

from mesh.kube.apiserver.errors import ApiError
from mesh.kube.apiserver.kinds import RESOURCE_TYPES, Registry, ResourceType
from mesh.kube.apiserver.lab import LAB_ANNOTATION, LabStateError, sync_lab
from mesh.kube.apiserver.runner import BackgroundApiServer
from mesh.kube.apiserver.server import ApiServer, RequestRecord, UserInfo
from mesh.kube.apiserver.store import Change, Store

__all__ = [
    "LAB_ANNOTATION",
    "RESOURCE_TYPES",
    "ApiError",
    "ApiServer",
    "BackgroundApiServer",
    "Change",
    "LabStateError",
    "Registry",
    "RequestRecord",
    "ResourceType",
    "Store",
    "UserInfo",
    "sync_lab",
]
