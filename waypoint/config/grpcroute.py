"""GRPCRoute (gateway.networking.k8s.io/v1) basics: method and header matches, weights, header
modifiers and mirrors.

A gRPC call is an HTTP/2 POST to `/<service>/<method>`, so method matches become path matches, the way
Istio translates them: Exact service+method is an exact path, service alone a prefix `/<svc>/`, method
alone (or any RegularExpression) an RE2 pattern over the path. The result is an ordinary route, sorted
with the HTTP precedence rules on those paths.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Annotated, Any

from pydantic import Field

from waypoint.config.common import Metadata, Strict, one_of
from waypoint.config.errors import FieldError
from waypoint.config.httproute import (
    BackendRefSpec,
    FilterSpec,
    HeaderMatchSpec,
    ParentRefSpec,
    RuleSpec,
    _parents,
    _regex,
    convert_rule,
    parse_route_doc,
)
from waypoint.config.model import (
    DEFAULT_CLUSTER_DOMAIN,
    HeaderMatch,
    MatchKind,
    PathKind,
    PathMatch,
    RequestMatch,
    ResourceRef,
    StringMatcher,
)
from waypoint.config.parsed import ParsedRoute

_NAME = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$")


class GRPCMethodMatchSpec(Strict):
    type: Annotated[str, one_of("Exact", "RegularExpression")] = "Exact"
    service: Annotated[str, Field(max_length=1024)] | None = None
    method: Annotated[str, Field(max_length=1024)] | None = None


class GRPCMatchSpec(Strict):
    method: GRPCMethodMatchSpec | None = None
    headers: Annotated[list[HeaderMatchSpec], Field(max_length=16)] = Field(default_factory=list)


class GRPCRuleSpec(Strict):
    name: str | None = None
    matches: Annotated[list[GRPCMatchSpec], Field(max_length=64)] = Field(default_factory=list)
    filters: Annotated[list[FilterSpec], Field(max_length=16)] = Field(default_factory=list)
    backend_refs: Annotated[list[BackendRefSpec], Field(max_length=16)] = Field(default_factory=list)
    session_persistence: dict[str, Any] | None = None


class GRPCRouteSpec(Strict):
    parent_refs: Annotated[list[ParentRefSpec], Field(max_length=32)] = Field(default_factory=list)
    hostnames: list[str] = Field(default_factory=list)
    rules: Annotated[list[GRPCRuleSpec], Field(max_length=16)] = Field(default_factory=lambda: [GRPCRuleSpec()])


class GRPCRouteDoc(Strict):
    api_version: str
    kind: str
    metadata: Metadata
    spec: GRPCRouteSpec
    status: Any = None


def method_path_match(spec: GRPCMethodMatchSpec, where: str) -> PathMatch:
    svc, method = spec.service, spec.method
    if not svc and not method:
        raise FieldError(where, "at least one of service and method is required")
    if spec.type == "Exact":
        if svc and not _NAME.match(svc):
            raise FieldError(f"{where}.service", f"{svc!r} is not a valid gRPC service name")
        if method and not re.match(r"^[A-Za-z_][A-Za-z_0-9]*$", method):
            raise FieldError(f"{where}.method", f"{method!r} is not a valid gRPC method name")
        if svc and method:
            return PathMatch(PathKind.EXACT, f"/{svc}/{method}")
        if svc:
            return PathMatch(PathKind.STRING_PREFIX, f"/{svc}/")
        return PathMatch(PathKind.REGEX, f"/[^/]+/{re.escape(method or '')}")
    if svc:
        _regex(svc, f"{where}.service")
    if method:
        _regex(method, f"{where}.method")
    if svc and method:
        return PathMatch(PathKind.REGEX, f"/{svc}/{method}")
    if svc:
        return PathMatch(PathKind.REGEX, f"/{svc}/.+")
    return PathMatch(PathKind.REGEX, f"/[^/]+/{method}")


def _convert_match(m: GRPCMatchSpec, where: str) -> RequestMatch:
    path = method_path_match(m.method, f"{where}.method") if m.method else None
    headers = []
    seen: set[str] = set()
    for i, h in enumerate(m.headers):
        key = h.name.lower()
        if key in seen:
            continue
        seen.add(key)
        if h.type == "RegularExpression":
            _regex(h.value, f"{where}.headers[{i}].value")
            headers.append(HeaderMatch(key, StringMatcher(MatchKind.REGEX, h.value)))
        else:
            headers.append(HeaderMatch(key, StringMatcher(MatchKind.EXACT, h.value)))
    return RequestMatch(path=path, headers=tuple(headers))


def _convert(doc: GRPCRouteDoc, ref: ResourceRef, domain: str) -> ParsedRoute:
    parents, warnings = _parents(doc.spec, ref.namespace)  # type: ignore[arg-type]
    rules = []
    for i, rule in enumerate(doc.spec.rules):
        where = f"spec.rules[{i}]"
        matches = tuple(_convert_match(m, f"{where}.matches[{j}]") for j, m in enumerate(rule.matches))
        as_http = RuleSpec.model_construct(name=rule.name, matches=[], filters=rule.filters,
                                           backend_refs=rule.backend_refs, timeouts=None, retry=None,
                                           session_persistence=rule.session_persistence)
        rules.append(replace(convert_rule(as_http, i, ref.namespace, domain, grpc=True), matches=matches))
    return ParsedRoute(ref=ref, created=doc.metadata.created(), parents=parents, rules=tuple(rules),
                       warnings=tuple(warnings))


def parse_grpcroute(doc: Any, domain: str = DEFAULT_CLUSTER_DOMAIN) -> ParsedRoute:
    return parse_route_doc(doc, "GRPCRoute", GRPCRouteDoc, domain, _convert)
