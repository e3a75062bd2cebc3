"""Discovery documents (`/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`, `/version`, `/openapi/v3`).

kubectl maps `kubectl get po` to a URL only through these, so they must describe every served type with
its kind, scope, short names and verbs. The OpenAPI v3 documents are deliberately small: they declare the
PATCH operations with the `fieldValidation` parameter, which tells kubectl this server validates fields
itself, so `kubectl apply` works without the full schemas a real server publishes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mesh.kube.apiserver.kinds import Registry, ResourceType

SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-nodemesh-lab",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def api_versions(server_address: str) -> dict[str, Any]:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def _group_entry(group: str, versions: list[str]) -> dict[str, Any]:
    gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": gvs, "preferredVersion": gvs[0]}


def api_group_list(registry: Registry) -> dict[str, Any]:
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [_group_entry(g, vs) for g, vs in registry.group_versions().items()]}


def api_group(registry: Registry, group: str) -> dict[str, Any] | None:
    versions = registry.group_versions().get(group)
    if not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group_entry(group, versions)}


def _resource_entries(t: ResourceType) -> list[dict[str, Any]]:
    main: dict[str, Any] = {"name": t.plural, "singularName": t.singular, "namespaced": t.namespaced,
                            "kind": t.kind, "verbs": list(t.verbs)}
    if t.short_names:
        main["shortNames"] = list(t.short_names)
    if t.categories:
        main["categories"] = list(t.categories)
    out = [main]
    for sub in t.subresources:
        out.append({"name": f"{t.plural}/{sub}", "singularName": "", "namespaced": t.namespaced, "kind": t.kind,
                    "verbs": ["get", "patch", "update"]})
    return out


def api_resource_list(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    types = registry.in_group_version(group, version)
    if not types:
        return None
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [e for t in types for e in _resource_entries(t)]}


# --- OpenAPI v3 ------------------------------------------------------------------------------------


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def openapi_gv_document(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    types = registry.in_group_version(group, version)
    if not types:
        return None
    paths: dict[str, Any] = {}
    field_validation = {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True},
                        "description": "Ignore, Warn or Strict: how the server treats unknown or duplicate fields"}
    for t in types:
        gvk = {"group": t.group, "version": t.version, "kind": t.kind}
        item = f"{t.base_path('{namespace}')}/{{name}}"
        paths[item] = {
            "get": {"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "get",
                    "responses": {"200": {"description": "OK"}}},
            "patch": {"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "patch",
                      "parameters": [field_validation], "responses": {"200": {"description": "OK"}}},
        }
        paths[t.base_path("{namespace}")] = {
            "post": {"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "post",
                     "parameters": [field_validation], "responses": {"201": {"description": "Created"}}},
        }
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths, "components": {"schemas": {}}}


def openapi_root(registry: Registry) -> dict[str, Any]:
    gvs = [("", "v1")] + [(g, v) for g, vs in registry.group_versions().items() for v in vs]
    paths = {}
    for group, version in gvs:
        doc = openapi_gv_document(registry, group, version)
        digest = hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32].upper()
        paths[_gv_path(group, version)] = {"serverRelativeURL": f"/openapi/v3/{_gv_path(group, version)}?hash={digest}"}
    return {"paths": paths}
