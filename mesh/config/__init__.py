"""The mesh config model (workloads, services, L4 policies), its sources, and the state they feed.

- `model`: the frozen dataclasses, mirroring ztunnel's workload API;
- `localconfig`: ztunnel's local config file format, parsed strictly;
- `istio`: Istio AuthorizationPolicy YAML translated as istiod does for ztunnel;
- `labstate`: the netns lab's state file as workloads and services;
- `store`: the merged, immutable snapshot and its change subscribers;
- `filesource`: files watched for changes and fed into the store.
"""

from mesh.config.errors import ConfigError
from mesh.config.filesource import FileSource, lab_state_source, local_config_source, policy_file_source
from mesh.config.istio import TranslatedPolicy, parse_policy_documents, translate_policy
from mesh.config.labstate import ambient_enrolled, config_from_lab_state, workloads_from_lab_state
from mesh.config.localconfig import dump_local_config, load_local_config, parse_local_config
from mesh.config.model import (
    Action,
    Authorization,
    ConfigSet,
    Endpoint,
    GatewayAddress,
    HealthStatus,
    Match,
    NamespacedHostname,
    NetworkAddress,
    Protocol,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    Workload,
)
from mesh.config.store import ConfigStore, MeshSnapshot, SnapshotChange, build_snapshot

__all__ = [
    "Action",
    "Authorization",
    "ConfigError",
    "ConfigSet",
    "ConfigStore",
    "Endpoint",
    "FileSource",
    "GatewayAddress",
    "HealthStatus",
    "Match",
    "MeshSnapshot",
    "NamespacedHostname",
    "NetworkAddress",
    "Protocol",
    "Scope",
    "Service",
    "ServiceAccountMatch",
    "SnapshotChange",
    "StringMatch",
    "TranslatedPolicy",
    "Workload",
    "ambient_enrolled",
    "build_snapshot",
    "config_from_lab_state",
    "dump_local_config",
    "lab_state_source",
    "load_local_config",
    "local_config_source",
    "parse_local_config",
    "parse_policy_documents",
    "policy_file_source",
    "translate_policy",
    "workloads_from_lab_state",
]
