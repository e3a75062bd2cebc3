"""The resource types the test double serves, with the facts discovery documents and clients need.

Each entry says what `kubectl api-resources` would show for the real type: plural, kind, short names, scope
and verbs. Objects of every type are stored as plain JSON; only a few types get behaviour beyond metadata
handling (see `store.py` and `controllers.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True, eq=False)  # identity: each type is one registry singleton
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    # Field selectors the real server accepts for this type, beyond metadata.name and metadata.namespace.
    field_labels: tuple[str, ...] = ()
    # Status is written only through the /status subresource (writes to the object keep the old status).
    status_subresource: bool = False
    # The type's patch merge keys for strategic merge patch, by dotted list path (see patch.py).
    merge_keys: dict[str, str] = field(default_factory=dict)
    # Lists with patchStrategy=merge but no key: primitive sets merged as unions.
    merge_sets: frozenset[str] = frozenset()

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def key(self) -> str:
        """`plural.group`, the name kubectl prints in `api-resources` and errors (`pods`, `gateways.gateway...`)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def supports_strategic_merge(self) -> bool:
        """Only types compiled into the real server accept strategic merge patch; custom resources answer 415."""
        return self.group in BUILTIN_GROUPS

    def base_path(self, namespace: str | None = None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            return f"{root}/namespaces/{namespace}/{self.plural}"
        return f"{root}/{self.plural}"


BUILTIN_GROUPS = frozenset({"", "discovery.k8s.io", "authentication.k8s.io"})

_META_SETS = frozenset({"metadata.finalizers"})
_META_KEYS = {"metadata.ownerReferences": "uid"}

_POD_KEYS = {
    **_META_KEYS,
    "spec.containers": "name",
    "spec.initContainers": "name",
    "spec.ephemeralContainers": "name",
    "spec.containers.ports": "containerPort",
    "spec.initContainers.ports": "containerPort",
    "spec.containers.env": "name",
    "spec.initContainers.env": "name",
    "spec.containers.volumeMounts": "mountPath",
    "spec.initContainers.volumeMounts": "mountPath",
    "spec.containers.volumeDevices": "devicePath",
    "spec.volumes": "name",
    "spec.imagePullSecrets": "name",
    "spec.hostAliases": "ip",
    "spec.topologySpreadConstraints": "topologyKey",
    "spec.resourceClaims": "name",
    "status.conditions": "type",
    "status.podIPs": "ip",
    "status.hostIPs": "ip",
    "status.ephemeralContainerStatuses": "name",
}

CORE_PODS = ResourceType(
    "", "v1", "pods", "Pod", short_names=("po",), categories=("all",), subresources=("status",),
    field_labels=("spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                  "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"),
    status_subresource=True, merge_keys=_POD_KEYS, merge_sets=_META_SETS,
)
CORE_NAMESPACES = ResourceType(
    "", "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",), subresources=("status",),
    verbs=("create", "delete", "get", "list", "patch", "update", "watch"), field_labels=("status.phase",),
    status_subresource=True, merge_keys=dict(_META_KEYS), merge_sets=_META_SETS,
)
CORE_SERVICES = ResourceType(
    "", "v1", "services", "Service", short_names=("svc",), categories=("all",), subresources=("status",),
    verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"),
    field_labels=("spec.clusterIP", "spec.type"), status_subresource=True,
    merge_keys={**_META_KEYS, "spec.ports": "port"}, merge_sets=_META_SETS,
)
CORE_SERVICEACCOUNTS = ResourceType(
    "", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",),
    merge_keys={**_META_KEYS, "secrets": "name"}, merge_sets=_META_SETS,
)
CORE_NODES = ResourceType(
    "", "v1", "nodes", "Node", namespaced=False, short_names=("no",), subresources=("status",),
    field_labels=("spec.unschedulable",), status_subresource=True,
    merge_keys={**_META_KEYS, "status.conditions": "type", "status.addresses": "type"},
    merge_sets=_META_SETS | {"spec.podCIDRs"},
)
ENDPOINTSLICES = ResourceType(
    "discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", field_labels=("addressType",),
    merge_keys=dict(_META_KEYS), merge_sets=_META_SETS,
)
TOKENREVIEWS = ResourceType(
    "authentication.k8s.io", "v1", "tokenreviews", "TokenReview", namespaced=False, verbs=("create",),
)


def _custom(group: str, plural: str, kind: str, *short: str, namespaced: bool = True,
            status: bool = False, categories: tuple[str, ...] = ()) -> ResourceType:
    return ResourceType(group, "v1", plural, kind, namespaced=namespaced, short_names=short,
                        subresources=("status",) if status else (), status_subresource=status,
                        categories=categories)


ISTIO_SECURITY = "security.istio.io"
ISTIO_NETWORKING = "networking.istio.io"
GATEWAY_API = "gateway.networking.k8s.io"

AUTHORIZATION_POLICIES = _custom(ISTIO_SECURITY, "authorizationpolicies", "AuthorizationPolicy", "ap",
                                 status=True, categories=("istio-io", "security-istio-io"))
PEER_AUTHENTICATIONS = _custom(ISTIO_SECURITY, "peerauthentications", "PeerAuthentication", "pa",
                               status=True, categories=("istio-io", "security-istio-io"))
VIRTUAL_SERVICES = _custom(ISTIO_NETWORKING, "virtualservices", "VirtualService", "vs", status=True,
                           categories=("istio-io", "networking-istio-io"))
DESTINATION_RULES = _custom(ISTIO_NETWORKING, "destinationrules", "DestinationRule", "dr", status=True,
                            categories=("istio-io", "networking-istio-io"))
SERVICE_ENTRIES = _custom(ISTIO_NETWORKING, "serviceentries", "ServiceEntry", "se", status=True,
                          categories=("istio-io", "networking-istio-io"))
GATEWAY_CLASSES = _custom(GATEWAY_API, "gatewayclasses", "GatewayClass", "gc", namespaced=False, status=True,
                          categories=("gateway-api",))
GATEWAYS = _custom(GATEWAY_API, "gateways", "Gateway", "gtw", status=True, categories=("gateway-api",))
HTTP_ROUTES = _custom(GATEWAY_API, "httproutes", "HTTPRoute", status=True, categories=("gateway-api",))
GRPC_ROUTES = _custom(GATEWAY_API, "grpcroutes", "GRPCRoute", status=True, categories=("gateway-api",))

RESOURCE_TYPES: tuple[ResourceType, ...] = (
    CORE_NAMESPACES, CORE_PODS, CORE_SERVICES, CORE_SERVICEACCOUNTS, CORE_NODES, ENDPOINTSLICES, TOKENREVIEWS,
    AUTHORIZATION_POLICIES, PEER_AUTHENTICATIONS, VIRTUAL_SERVICES, DESTINATION_RULES, SERVICE_ENTRIES,
    GATEWAY_CLASSES, GATEWAYS, HTTP_ROUTES, GRPC_ROUTES,
)


class Registry:
    """Lookup of the served types by group/version/plural, and by group/kind for objects in bodies."""

    def __init__(self, types: tuple[ResourceType, ...] = RESOURCE_TYPES) -> None:
        self.types = types
        self._by_path = {(t.group, t.version, t.plural): t for t in types}
        self._by_kind = {(t.group, t.version, t.kind): t for t in types}

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_path.get((group, version, plural))

    def by_kind(self, api_version: str, kind: str) -> ResourceType | None:
        group, _, version = api_version.rpartition("/")
        return self._by_kind.get((group, version, kind))

    def group_versions(self) -> dict[str, list[str]]:
        """Named groups (not core) to their versions, in registration order."""
        out: dict[str, list[str]] = {}
        for t in self.types:
            if t.group and t.version not in out.setdefault(t.group, []):
                out[t.group].append(t.version)
        return out

    def in_group_version(self, group: str, version: str) -> list[ResourceType]:
        return [t for t in self.types if t.group == group and t.version == version]
