"""HTTPRoute (gateway.networking.k8s.io/v1) for the mesh (GAMMA): schema, checks, translation.

The schema is the CRD's, with its defaults (path PathPrefix "/", header/query type Exact, weight 1,
redirect status 302). Translation follows what Istio generates for a waypoint:
- `timeouts.request` is the route timeout ("0s" disables it); `timeouts.backendRequest` is the per-try
  timeout when a `retry` stanza exists and otherwise replaces the route timeout;
- `retry` retries connect-failure, refused-stream, unavailable and cancelled plus the listed codes,
  `attempts` defaulting to 2 (0 disables), `backoff` the base interval; without the stanza the route
  carries Istio's default retry policy;
- a rule without backendRefs and without a redirect sends traffic to the parent Service itself (the
  GAMMA reading of "no override").
Unsupported parts (CORS, ExternalAuth, ExtensionRef filters, sessionPersistence, non-core backend
filters) reject the resource, so nothing is silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError

from waypoint.config.common import (
    GatewayDuration,
    HeaderName,
    HeaderValue,
    Metadata,
    Port,
    Strict,
    one_of,
)
from waypoint.config.errors import FieldError, ResourceError, problems_from
from waypoint.config.model import (
    DEFAULT_CLUSTER_DOMAIN,
    Backend,
    HeaderMatch,
    HeaderMutation,
    MatchKind,
    Mirror,
    PathKind,
    PathMatch,
    PathRewrite,
    PathRewriteKind,
    QueryMatch,
    Redirect,
    RequestMatch,
    ResourceRef,
    Rewrite,
    RouteAction,
    ServiceRef,
    StringMatcher,
)
from waypoint.config.parsed import ParentAttachment, ParsedRoute, ParsedRule
from waypoint.config.regex import RegexError, compile_re2
from waypoint.resilience.retry import DEFAULT_RETRY_POLICY, RetryPolicy

GATEWAY_GROUP = "gateway.networking.k8s.io"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
GATEWAY_RETRY_ON = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled"})


class HeaderPair(Strict):
    name: HeaderName
    value: HeaderValue


class HeaderModifierSpec(Strict):
    set: Annotated[list[HeaderPair], Field(max_length=16)] = Field(default_factory=list)
    add: Annotated[list[HeaderPair], Field(max_length=16)] = Field(default_factory=list)
    remove: Annotated[list[HeaderName], Field(max_length=16)] = Field(default_factory=list)


class PathMatchSpec(Strict):
    type: Annotated[str, one_of("Exact", "PathPrefix", "RegularExpression")] = "PathPrefix"
    value: Annotated[str, Field(max_length=1024)] = "/"


class HeaderMatchSpec(Strict):
    type: Annotated[str, one_of("Exact", "RegularExpression")] = "Exact"
    name: HeaderName
    value: Annotated[str, Field(min_length=1, max_length=4096)]


class QueryMatchSpec(Strict):
    type: Annotated[str, one_of("Exact", "RegularExpression")] = "Exact"
    name: Annotated[str, Field(min_length=1, max_length=256)]
    value: Annotated[str, Field(min_length=1, max_length=1024)]


class MatchSpec(Strict):
    path: PathMatchSpec | None = None
    headers: Annotated[list[HeaderMatchSpec], Field(max_length=16)] = Field(default_factory=list)
    query_params: Annotated[list[QueryMatchSpec], Field(max_length=16)] = Field(default_factory=list)
    method: Annotated[str, one_of(*HTTP_METHODS)] | None = None


class ObjectRef(Strict):
    group: str = ""
    kind: str = "Service"
    name: Annotated[str, Field(min_length=1, max_length=253)]
    namespace: str | None = None
    port: Port | None = None


class Fraction(Strict):
    numerator: Annotated[int, Field(ge=0)]
    denominator: Annotated[int, Field(ge=1)] = 100


class MirrorSpec(Strict):
    backend_ref: ObjectRef
    percent: Annotated[int, Field(ge=0, le=100)] | None = None
    fraction: Fraction | None = None


class PathModifierSpec(Strict):
    type: Annotated[str, one_of("ReplaceFullPath", "ReplacePrefixMatch")]
    replace_full_path: Annotated[str, Field(max_length=1024)] | None = None
    replace_prefix_match: Annotated[str, Field(max_length=1024)] | None = None


class RedirectSpec(Strict):
    scheme: Annotated[str, one_of("http", "https")] | None = None
    hostname: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    path: PathModifierSpec | None = None
    port: Port | None = None
    status_code: Annotated[int, Field()] = 302


class RewriteSpec(Strict):
    hostname: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    path: PathModifierSpec | None = None


FILTER_TYPES = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "RequestRedirect",
                "URLRewrite", "ExtensionRef", "CORS", "ExternalAuth")


class FilterSpec(Strict):
    type: Annotated[str, one_of(*FILTER_TYPES)]
    request_header_modifier: HeaderModifierSpec | None = None
    response_header_modifier: HeaderModifierSpec | None = None
    request_mirror: MirrorSpec | None = None
    request_redirect: RedirectSpec | None = None
    url_rewrite: RewriteSpec | None = Field(default=None, alias="urlRewrite")
    extension_ref: dict[str, Any] | None = None
    cors: dict[str, Any] | None = None
    external_auth: dict[str, Any] | None = None


class BackendRefSpec(ObjectRef):
    weight: Annotated[int, Field(ge=0, le=1_000_000)] = 1
    filters: Annotated[list[FilterSpec], Field(max_length=16)] = Field(default_factory=list)


class TimeoutsSpec(Strict):
    request: GatewayDuration | None = None
    backend_request: GatewayDuration | None = None


class RetrySpec(Strict):
    codes: list[Annotated[int, Field(ge=400, le=599)]] = Field(default_factory=list)
    attempts: Annotated[int, Field(ge=0)] | None = None
    backoff: GatewayDuration | None = None


class RuleSpec(Strict):
    name: str | None = None
    matches: Annotated[list[MatchSpec], Field(max_length=64)] = Field(default_factory=list)
    filters: Annotated[list[FilterSpec], Field(max_length=16)] = Field(default_factory=list)
    backend_refs: Annotated[list[BackendRefSpec], Field(max_length=16)] = Field(default_factory=list)
    timeouts: TimeoutsSpec | None = None
    retry: RetrySpec | None = None
    session_persistence: dict[str, Any] | None = None


class ParentRefSpec(Strict):
    group: str = GATEWAY_GROUP
    kind: str = "Gateway"
    namespace: str | None = None
    name: Annotated[str, Field(min_length=1, max_length=253)]
    section_name: str | None = None
    port: Port | None = None


class HTTPRouteSpec(Strict):
    parent_refs: Annotated[list[ParentRefSpec], Field(max_length=32)] = Field(default_factory=list)
    hostnames: list[str] = Field(default_factory=list)
    rules: Annotated[list[RuleSpec], Field(max_length=16)] = Field(default_factory=lambda: [RuleSpec()])


class HTTPRouteDoc(Strict):
    api_version: str
    kind: str
    metadata: Metadata
    spec: HTTPRouteSpec
    status: Any = None


# --- translation ---------------------------------------------------------------------------------------


def _check_path_value(value: str, where: str) -> None:
    if not value.startswith("/"):
        raise FieldError(where, "must start with '/'")
    if "//" in value:
        raise FieldError(where, "must not contain '//'")


def _regex(value: str, where: str) -> None:
    try:
        compile_re2(value)
    except RegexError as exc:
        raise FieldError(where, str(exc)) from None


def convert_match(spec: MatchSpec, where: str) -> RequestMatch:
    path_spec = spec.path or PathMatchSpec()
    if path_spec.type == "RegularExpression":
        _regex(path_spec.value, f"{where}.path.value")
        path = PathMatch(PathKind.REGEX, path_spec.value)
    else:
        _check_path_value(path_spec.value, f"{where}.path.value")
        path = PathMatch(PathKind.EXACT if path_spec.type == "Exact" else PathKind.PATH_PREFIX, path_spec.value)
    headers: list[HeaderMatch] = []
    seen: set[str] = set()
    for i, h in enumerate(spec.headers):
        key = h.name.lower()
        if key in seen:
            continue  # the spec: only the first entry of a repeated name counts
        seen.add(key)
        if h.type == "RegularExpression":
            _regex(h.value, f"{where}.headers[{i}].value")
            headers.append(HeaderMatch(key, StringMatcher(MatchKind.REGEX, h.value)))
        else:
            headers.append(HeaderMatch(key, StringMatcher(MatchKind.EXACT, h.value)))
    query: list[QueryMatch] = []
    seen_q: set[str] = set()
    for i, q in enumerate(spec.query_params):
        if q.name in seen_q:
            continue
        seen_q.add(q.name)
        if q.type == "RegularExpression":
            _regex(q.value, f"{where}.queryParams[{i}].value")
            query.append(QueryMatch(q.name, StringMatcher(MatchKind.REGEX, q.value)))
        else:
            query.append(QueryMatch(q.name, StringMatcher(MatchKind.EXACT, q.value)))
    method = StringMatcher(MatchKind.EXACT, spec.method) if spec.method else None
    return RequestMatch(path=path, method=method, headers=tuple(headers), query=tuple(query))


def header_mutation(spec: HeaderModifierSpec | None, where: str) -> HeaderMutation:
    if spec is None:
        raise FieldError(where, "required for this filter type")
    for field_name, entries in (("set", spec.set), ("add", spec.add)):
        names = [e.name.lower() for e in entries]
        if len(names) != len(set(names)):
            raise FieldError(f"{where}.{field_name}", "header names must be unique")
    return HeaderMutation(
        set=tuple((e.name.lower(), e.value) for e in spec.set),
        add=tuple((e.name.lower(), e.value) for e in spec.add),
        remove=tuple(n.lower() for n in spec.remove),
    )


def _path_modifier(spec: PathModifierSpec | None, where: str, match_path: PathMatchSpec | None,
                   has_matches: bool) -> PathRewrite | None:
    if spec is None:
        return None
    if spec.type == "ReplaceFullPath":
        if spec.replace_full_path is None:
            raise FieldError(f"{where}.replaceFullPath", "required when type is ReplaceFullPath")
        if spec.replace_prefix_match is not None:
            raise FieldError(f"{where}.replacePrefixMatch", "must not be set when type is ReplaceFullPath")
        _check_path_value(spec.replace_full_path, f"{where}.replaceFullPath")
        return PathRewrite(PathRewriteKind.FULL, spec.replace_full_path)
    if spec.replace_prefix_match is None:
        raise FieldError(f"{where}.replacePrefixMatch", "required when type is ReplacePrefixMatch")
    if spec.replace_full_path is not None:
        raise FieldError(f"{where}.replaceFullPath", "must not be set when type is ReplacePrefixMatch")
    _check_path_value(spec.replace_prefix_match, f"{where}.replacePrefixMatch")
    if has_matches and (match_path is None or match_path.type != "PathPrefix"):
        raise FieldError(f"{where}.type", "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
    return PathRewrite(PathRewriteKind.PREFIX, spec.replace_prefix_match)


def _backend(ref: ObjectRef, route_ns: str, domain: str, where: str, weight: int = 1) -> Backend:
    namespace = ref.namespace or route_ns
    invalid = None
    if ref.group not in ("", "core") or ref.kind != "Service":
        invalid = f"{where}: backend kind {ref.group or 'core'}/{ref.kind} is not supported (only core Service)"
    elif ref.port is None:
        raise FieldError(f"{where}.port", "required when referring to a Service")
    return Backend(host=f"{ref.name}.{namespace}.svc.{domain}", namespace=namespace, name=ref.name,
                   port=ref.port, weight=weight, invalid=invalid, invalid_status=500)


def mirror_percent(spec: MirrorSpec, where: str) -> float:
    if spec.percent is not None and spec.fraction is not None:
        raise FieldError(where, "set at most one of percent and fraction")
    if spec.fraction is not None:
        if spec.fraction.numerator > spec.fraction.denominator:
            raise FieldError(f"{where}.fraction", "numerator must not exceed denominator")
        return 100.0 * spec.fraction.numerator / spec.fraction.denominator
    return float(spec.percent) if spec.percent is not None else 100.0


def _unsupported_filter(f: FilterSpec, where: str) -> None:
    raise FieldError(f"{where}.type", f"filter type {f.type} is not supported by this waypoint")


def convert_rule(rule: RuleSpec, index: int, route_ns: str, domain: str, grpc: bool = False) -> ParsedRule:
    where = f"spec.rules[{index}]"
    if rule.session_persistence is not None:
        raise FieldError(f"{where}.sessionPersistence", "session persistence is not supported by this waypoint")
    matches = tuple(convert_match(m, f"{where}.matches[{i}]") for i, m in enumerate(rule.matches))
    request_headers = response_headers = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: list[Mirror] = []
    seen: set[str] = set()
    first_path = rule.matches[0].path if rule.matches else None
    for i, f in enumerate(rule.filters):
        fw = f"{where}.filters[{i}]"
        if f.type in seen and f.type != "RequestMirror":
            raise FieldError(f"{fw}.type", f"{f.type} may appear at most once per rule")
        seen.add(f.type)
        if f.type == "RequestHeaderModifier":
            request_headers = header_mutation(f.request_header_modifier, f"{fw}.requestHeaderModifier")
        elif f.type == "ResponseHeaderModifier":
            response_headers = header_mutation(f.response_header_modifier, f"{fw}.responseHeaderModifier")
        elif f.type == "RequestMirror" and f.request_mirror is not None:
            percent = mirror_percent(f.request_mirror, f"{fw}.requestMirror")
            mirror_backend = _backend(f.request_mirror.backend_ref, route_ns, domain, f"{fw}.requestMirror.backendRef")
            mirrors.append(Mirror(mirror_backend, percent))
        elif f.type == "RequestMirror":
            raise FieldError(f"{fw}.requestMirror", "required for this filter type")
        elif f.type == "RequestRedirect" and not grpc:
            spec = f.request_redirect
            if spec is None:
                raise FieldError(f"{fw}.requestRedirect", "required for this filter type")
            if spec.status_code not in (301, 302, 303, 307, 308):
                raise FieldError(f"{fw}.requestRedirect.statusCode", "must be one of 301, 302, 303, 307, 308")
            for j, m in enumerate(rule.matches):
                if spec.path is not None and spec.path.type == "ReplacePrefixMatch" and (
                        m.path is not None and m.path.type != "PathPrefix"):
                    raise FieldError(f"{where}.matches[{j}].path.type",
                                     "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
            redirect = Redirect(status=spec.status_code, scheme=spec.scheme, hostname=spec.hostname, port=spec.port,
                                path=_path_modifier(spec.path, f"{fw}.requestRedirect.path", first_path or
                                                    PathMatchSpec(), bool(rule.matches)))
        elif f.type == "URLRewrite" and not grpc:
            spec_rw = f.url_rewrite
            if spec_rw is None:
                raise FieldError(f"{fw}.urlRewrite", "required for this filter type")
            for j, m in enumerate(rule.matches):
                if spec_rw.path is not None and spec_rw.path.type == "ReplacePrefixMatch" and (
                        m.path is not None and m.path.type != "PathPrefix"):
                    raise FieldError(f"{where}.matches[{j}].path.type",
                                     "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
            rewrite = Rewrite(hostname=spec_rw.hostname,
                              path=_path_modifier(spec_rw.path, f"{fw}.urlRewrite.path", first_path or PathMatchSpec(),
                                                  bool(rule.matches)))
        else:
            _unsupported_filter(f, fw)
    if redirect is not None and rewrite is not None:
        raise FieldError(f"{where}.filters", "RequestRedirect and URLRewrite cannot be combined in one rule")
    if redirect is not None and rule.backend_refs:
        raise FieldError(f"{where}.backendRefs", "a rule with a RequestRedirect must not have backendRefs")
    backends = []
    for i, ref in enumerate(rule.backend_refs):
        bw = f"{where}.backendRefs[{i}]"
        b = _backend(ref, route_ns, domain, bw, ref.weight)
        req_mut = resp_mut = HeaderMutation()
        for j, f in enumerate(ref.filters):
            fw = f"{bw}.filters[{j}]"
            if f.type == "RequestHeaderModifier":
                req_mut = header_mutation(f.request_header_modifier, f"{fw}.requestHeaderModifier")
            elif f.type == "ResponseHeaderModifier":
                resp_mut = header_mutation(f.response_header_modifier, f"{fw}.responseHeaderModifier")
            else:
                raise FieldError(f"{fw}.type", f"backendRef filter type {f.type} is not supported by this waypoint")
        backends.append(Backend(host=b.host, namespace=b.namespace, name=b.name, port=b.port, weight=b.weight,
                                request_headers=req_mut, response_headers=resp_mut, invalid=b.invalid,
                                invalid_status=500))
    timeout, retry = _timeouts_and_retry(rule, where)
    # No backendRefs and nothing answering locally: the store points the rule at its parent Service.
    routes_to_parent = not backends and redirect is None
    action = RouteAction(
        backends=tuple(backends),
        request_headers=request_headers or HeaderMutation(),
        response_headers=response_headers or HeaderMutation(),
        redirect=redirect,
        rewrite=rewrite,
        mirrors=tuple(mirrors),
        timeout=timeout,
        retry=retry,
        gateway_semantics=True,
    )
    return ParsedRule(index=index, name=rule.name, matches=matches, action=action, routes_to_parent=routes_to_parent)


def _timeouts_and_retry(rule: RuleSpec, where: str) -> tuple[float | None, RetryPolicy | None]:
    request_timeout = rule.timeouts.request if rule.timeouts else None
    backend_timeout = rule.timeouts.backend_request if rule.timeouts else None
    if request_timeout and backend_timeout and backend_timeout > request_timeout:
        raise FieldError(f"{where}.timeouts.backendRequest", "must not be greater than timeouts.request")
    timeout = request_timeout or None
    if rule.retry is None:
        retry: RetryPolicy | None = DEFAULT_RETRY_POLICY
        if backend_timeout:
            timeout = backend_timeout
        return timeout, retry
    attempts = 2 if rule.retry.attempts is None else rule.retry.attempts
    if attempts == 0:
        # One attempt only: the tighter of the two timeouts bounds it.
        bounds = [t for t in (timeout, backend_timeout) if t]
        return (min(bounds) if bounds else None), None
    on = set(GATEWAY_RETRY_ON)
    codes = frozenset(rule.retry.codes)
    if codes:
        on.add("retriable-status-codes")
    retry = RetryPolicy(
        num_retries=attempts,
        retry_on=frozenset(on),
        retriable_status_codes=codes,
        per_try_timeout=backend_timeout or None,
        base_interval=rule.retry.backoff or 0.025,
    )
    return timeout, retry


def _parents(spec: HTTPRouteSpec, route_ns: str) -> tuple[tuple[ParentAttachment, ...], list[str]]:
    parents = []
    warnings = []
    for i, p in enumerate(spec.parent_refs):
        if p.group in ("", "core") and p.kind == "Service":
            parents.append(ParentAttachment(ServiceRef(p.namespace or route_ns, p.name), p.port))
        else:
            warnings.append(f"spec.parentRefs[{i}]: parent {p.group or 'core'}/{p.kind} {p.name} is not a Service; "
                            "the waypoint ignores it")
    return tuple(parents), warnings


def parse_route_doc(doc: Any, kind: str, model: type[Strict], domain: str,
                    convert: Any) -> ParsedRoute:
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    name = meta.get("name", "?") if isinstance(meta, dict) else "?"
    namespace = (meta.get("namespace") or "default") if isinstance(meta, dict) else "default"
    label = f"{kind} {namespace}/{name}"
    try:
        parsed = model.model_validate(doc)
    except ValidationError as exc:
        raise ResourceError(label, problems_from(exc)) from None
    ref = ResourceRef(kind, parsed.metadata.namespace, parsed.metadata.name)  # type: ignore[attr-defined]
    try:
        return convert(parsed, ref, domain)
    except FieldError as exc:
        raise ResourceError(str(ref), [(exc.path, exc.message)]) from None


def _convert_httproute(doc: HTTPRouteDoc, ref: ResourceRef, domain: str) -> ParsedRoute:
    parents, warnings = _parents(doc.spec, ref.namespace)
    if doc.spec.hostnames:
        warnings.append("spec.hostnames: ignored for Service parents (GAMMA)")
    rules = tuple(convert_rule(r, i, ref.namespace, domain) for i, r in enumerate(doc.spec.rules))
    return ParsedRoute(ref=ref, created=doc.metadata.created(), parents=parents, rules=rules,
                       warnings=tuple(warnings))


def parse_httproute(doc: Any, domain: str = DEFAULT_CLUSTER_DOMAIN) -> ParsedRoute:
    """Validate and translate one HTTPRoute document; raises ResourceError naming the bad field."""
    return parse_route_doc(doc, "HTTPRoute", HTTPRouteDoc, domain, _convert_httproute)
