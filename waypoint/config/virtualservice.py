"""VirtualService (networking.istio.io/v1): the `http` routes a waypoint applies.

Istio semantics kept: `http[]` rules are tried in order and the first match wins (a rule without `match`
catches everything); match entries are ORed, the fields inside one entry ANDed; weights split traffic
as weight/sum with 0-weight destinations dropped; a missing `retries` gives Istio's default retry
policy and `attempts: 0` none; fault percentages absent mean no fault; mirrors without a percentage
mirror everything. Short host names resolve in the VirtualService's namespace.

Waypoint specifics: `sourceLabels` cannot be evaluated without a client-side proxy and is dropped (as
Istio does, with a warning); `tcp`/`tls` routes are not L7 and are ignored with a warning; a
VirtualService bound only to non-mesh `gateways` does not apply. `delegate`, `corsPolicy`,
`exponentialDelay` and `http2Error` are rejected.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from pydantic import Field, ValidationError

from waypoint.config.common import HeaderName, HeaderValue, IstioDuration, Metadata, Port, Strict, one_of
from waypoint.config.errors import FieldError, ResourceError, problems_from
from waypoint.config.model import (
    DEFAULT_CLUSTER_DOMAIN,
    Backend,
    DirectResponseSpec,
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
    StringMatcher,
)
from waypoint.config.parsed import ParsedRule, ParsedVirtualService
from waypoint.config.regex import RegexError, compile_re2
from waypoint.flags import GRPC_STATUS_CODES
from waypoint.resilience.fault import AbortFault, DelayFault, FaultPolicy
from waypoint.resilience.retry import DEFAULT_RETRY_POLICY, RetryPolicy, parse_retry_on

# Error locations below a map field carry the user's key (a header name), rendered in brackets.
VS_MAP_FIELDS = frozenset({"headers", "queryParams", "withoutHeaders", "sourceLabels", "set", "add"})


class StringMatchSpec(Strict):
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


class PortSelector(Strict):
    number: Port | None = None


class DestinationSpec(Strict):
    host: Annotated[str, Field(min_length=1)]
    subset: str | None = None
    port: PortSelector | None = None


class HeaderOpsSpec(Strict):
    set: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    add: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    remove: list[HeaderName] = Field(default_factory=list)


class HeadersSpec(Strict):
    request: HeaderOpsSpec | None = None
    response: HeaderOpsSpec | None = None


class RouteDestinationSpec(Strict):
    destination: DestinationSpec
    weight: Annotated[int, Field(ge=0)] | None = None
    headers: HeadersSpec | None = None


class MatchRequestSpec(Strict):
    name: str | None = None
    uri: StringMatchSpec | None = None
    scheme: StringMatchSpec | None = None
    method: StringMatchSpec | None = None
    authority: StringMatchSpec | None = None
    headers: dict[str, StringMatchSpec] = Field(default_factory=dict)
    port: Port | None = None
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    query_params: dict[str, StringMatchSpec] = Field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, StringMatchSpec] = Field(default_factory=dict)
    source_namespace: str | None = None
    stat_prefix: str | None = None


class RedirectSpec(Strict):
    uri: str | None = None
    authority: str | None = None
    port: Port | None = None
    derive_port: Annotated[str, one_of("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")] | None = None
    scheme: str | None = None
    redirect_code: Annotated[int, Field(ge=300, le=399)] = 301


class BodySpec(Strict):
    string: str | None = None
    bytes: str | None = None


class DirectResponseSpecModel(Strict):
    status: Annotated[int, Field(ge=200, le=599)]
    body: BodySpec | None = None


class RegexRewriteSpec(Strict):
    match: str
    rewrite: str


class RewriteSpec(Strict):
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewriteSpec | None = None


class RetriesSpec(Strict):
    attempts: Annotated[int, Field(ge=0)] = 0
    per_try_timeout: IstioDuration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: IstioDuration | None = None


class PercentSpec(Strict):
    value: Annotated[float, Field(ge=0, le=100)]


class DelaySpec(Strict):
    fixed_delay: IstioDuration | None = None
    exponential_delay: Any = None
    percentage: PercentSpec | None = None
    percent: Annotated[int, Field(ge=0, le=100)] | None = None


class AbortSpec(Strict):
    http_status: Annotated[int, Field(ge=200, le=599)] | None = None
    grpc_status: Annotated[str, one_of(*GRPC_STATUS_CODES)] | None = None
    http2_error: Any = None
    percentage: PercentSpec | None = None


class FaultSpec(Strict):
    delay: DelaySpec | None = None
    abort: AbortSpec | None = None


class MirrorPolicySpec(Strict):
    destination: DestinationSpec
    percentage: PercentSpec | None = None


class HTTPRuleSpec(Strict):
    name: str | None = None
    match: list[MatchRequestSpec] = Field(default_factory=list)
    route: list[RouteDestinationSpec] = Field(default_factory=list)
    redirect: RedirectSpec | None = None
    direct_response: DirectResponseSpecModel | None = None
    delegate: Any = None
    rewrite: RewriteSpec | None = None
    timeout: IstioDuration | None = None
    retries: RetriesSpec | None = None
    fault: FaultSpec | None = None
    mirror: DestinationSpec | None = None
    mirror_percent: Annotated[int, Field(ge=0, le=100)] | None = None
    mirror_percentage: PercentSpec | None = None
    mirrors: list[MirrorPolicySpec] = Field(default_factory=list)
    cors_policy: Any = None
    headers: HeadersSpec | None = None


class VirtualServiceSpec(Strict):
    hosts: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    gateways: list[str] = Field(default_factory=list)
    http: list[HTTPRuleSpec] = Field(default_factory=list)
    tls: list[Any] = Field(default_factory=list)
    tcp: list[Any] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)


class VirtualServiceDoc(Strict):
    api_version: str
    kind: str
    metadata: Metadata
    spec: VirtualServiceSpec
    status: Any = None


# --- translation ---------------------------------------------------------------------------------------


def qualify(host: str, namespace: str, domain: str) -> str:
    """Istio's short-name rule: a name without dots lives in the resource's namespace."""
    if host == "*" or host.startswith("*.") or "." in host:
        return host.lower()
    return f"{host}.{namespace}.svc.{domain}".lower()


def string_matcher(spec: StringMatchSpec, where: str, ignore_case: bool = False,
                   allow_prefix: bool = True, empty_means_present: bool = False) -> StringMatcher:
    set_fields = [(k, v) for k, v in (("exact", spec.exact), ("prefix", spec.prefix), ("regex", spec.regex))
                  if v is not None]
    if not set_fields:
        if empty_means_present:
            return StringMatcher(MatchKind.PRESENT)
        raise FieldError(where, "set one of exact, prefix, regex")
    if len(set_fields) > 1:
        raise FieldError(where, "set only one of exact, prefix, regex")
    kind, value = set_fields[0]
    if kind == "prefix" and not allow_prefix:
        raise FieldError(f"{where}.prefix", "prefix is not supported here; use exact or regex")
    if kind == "regex":
        try:
            compile_re2(value)
        except RegexError as exc:
            raise FieldError(f"{where}.regex", str(exc)) from None
        return StringMatcher(MatchKind.REGEX, value, ignore_case)
    return StringMatcher(MatchKind.EXACT if kind == "exact" else MatchKind.PREFIX, value, ignore_case)


def _uri(spec: StringMatchSpec, where: str, ignore_case: bool) -> PathMatch:
    m = string_matcher(spec, where)
    kind = {MatchKind.EXACT: PathKind.EXACT, MatchKind.PREFIX: PathKind.STRING_PREFIX,
            MatchKind.REGEX: PathKind.REGEX}[m.kind]
    return PathMatch(kind, m.value, ignore_case)


def _match(spec: MatchRequestSpec, where: str, warnings: list[str]) -> RequestMatch:
    if spec.source_labels:
        warnings.append(f"{where}.sourceLabels: dropped at a waypoint (no client-side proxy to evaluate it)")
    if spec.gateways and "mesh" not in spec.gateways:
        warnings.append(f"{where}.gateways: this match names no 'mesh' gateway; it still applies at the waypoint")
    headers = [HeaderMatch(name.lower(), string_matcher(m, f'{where}.headers["{name}"]', empty_means_present=True))
               for name, m in spec.headers.items()]
    headers += [HeaderMatch(name.lower(),
                            string_matcher(m, f'{where}.withoutHeaders["{name}"]', empty_means_present=True),
                            invert=True)
                for name, m in spec.without_headers.items()]
    query = [QueryMatch(name, string_matcher(m, f'{where}.queryParams["{name}"]', allow_prefix=False,
                                             empty_means_present=True))
             for name, m in spec.query_params.items()]
    return RequestMatch(
        path=_uri(spec.uri, f"{where}.uri", spec.ignore_uri_case) if spec.uri else None,
        method=string_matcher(spec.method, f"{where}.method") if spec.method else None,
        headers=tuple(headers),
        query=tuple(query),
        scheme=string_matcher(spec.scheme, f"{where}.scheme") if spec.scheme else None,
        authority=string_matcher(spec.authority, f"{where}.authority") if spec.authority else None,
        port=spec.port,
        source_namespace=spec.source_namespace,
    )


def _ops(spec: HeaderOpsSpec | None) -> HeaderMutation:
    if spec is None:
        return HeaderMutation()
    return HeaderMutation(set=tuple((k.lower(), v) for k, v in spec.set.items()),
                          add=tuple((k.lower(), v) for k, v in spec.add.items()),
                          remove=tuple(n.lower() for n in spec.remove))


def _destination(spec: DestinationSpec, ns: str, domain: str, weight: int = 1,
                 headers: HeadersSpec | None = None) -> Backend:
    host = qualify(spec.host, ns, domain)
    if host.startswith("*"):
        raise FieldError("destination.host", "must not be a wildcard")
    parts = host.split(".")
    name, namespace = (parts[0], parts[1]) if len(parts) > 2 and parts[2] == "svc" else (host, ns)
    port = spec.port.number if spec.port else None
    return Backend(host=host, namespace=namespace, name=name, port=port, subset=spec.subset, weight=weight,
                   request_headers=_ops(headers.request) if headers else HeaderMutation(),
                   response_headers=_ops(headers.response) if headers else HeaderMutation(),
                   invalid_status=503)


def _percent(p: PercentSpec | None, legacy: int | None) -> float | None:
    if p is not None:
        return p.value
    if legacy is not None:
        return float(legacy)
    return None


def _fault(spec: FaultSpec | None, where: str) -> FaultPolicy | None:
    if spec is None:
        return None
    delay = abort = None
    if spec.delay is not None:
        d = spec.delay
        if d.exponential_delay is not None:
            raise FieldError(f"{where}.delay.exponentialDelay", "exponentialDelay is not supported")
        if d.fixed_delay is None:
            raise FieldError(f"{where}.delay.fixedDelay", "required field is missing")
        delay = DelayFault(d.fixed_delay, _percent(d.percentage, d.percent))
    if spec.abort is not None:
        a = spec.abort
        if a.http2_error is not None:
            raise FieldError(f"{where}.abort.http2Error", "http2Error is not supported")
        if (a.http_status is None) == (a.grpc_status is None):
            raise FieldError(f"{where}.abort", "set exactly one of httpStatus and grpcStatus")
        grpc = GRPC_STATUS_CODES[a.grpc_status] if a.grpc_status else None
        abort = AbortFault(a.http_status, grpc, _percent(a.percentage, None))
    if delay is None and abort is None:
        return None
    return FaultPolicy(delay, abort)


def _retry(spec: RetriesSpec | None, where: str) -> RetryPolicy | None:
    if spec is None:
        return DEFAULT_RETRY_POLICY
    if spec.attempts == 0:
        return None
    if spec.retry_on is None:
        on, codes = DEFAULT_RETRY_POLICY.retry_on, DEFAULT_RETRY_POLICY.retriable_status_codes
    else:
        try:
            on, codes = parse_retry_on(spec.retry_on)
        except ValueError as exc:
            raise FieldError(f"{where}.retryOn", str(exc)) from None
    return RetryPolicy(
        num_retries=spec.attempts,
        retry_on=on,
        retriable_status_codes=codes,
        per_try_timeout=spec.per_try_timeout,
        base_interval=spec.backoff or 0.025,
        retry_previous_hosts=spec.retry_ignore_previous_hosts is not False,
    )


def _redirect(spec: RedirectSpec) -> Redirect:
    derive = spec.derive_port == "FROM_PROTOCOL_DEFAULT"
    return Redirect(
        status=spec.redirect_code,
        scheme=spec.scheme,
        hostname=spec.authority,
        port=spec.port,
        path=PathRewrite(PathRewriteKind.FULL, spec.uri) if spec.uri else None,
        derive_port_from_scheme=derive,
        listener_port_fallback=False,
    )


def _rewrite(spec: RewriteSpec, where: str) -> Rewrite:
    if spec.uri is not None and spec.uri_regex_rewrite is not None:
        raise FieldError(where, "set at most one of uri and uriRegexRewrite")
    path = None
    if spec.uri is not None:
        path = PathRewrite(PathRewriteKind.PREFIX, spec.uri)
    elif spec.uri_regex_rewrite is not None:
        try:
            compile_re2(spec.uri_regex_rewrite.match)
        except RegexError as exc:
            raise FieldError(f"{where}.uriRegexRewrite.match", str(exc)) from None
        path = PathRewrite(PathRewriteKind.REGEX, spec.uri_regex_rewrite.rewrite, spec.uri_regex_rewrite.match)
    return Rewrite(hostname=spec.authority, path=path)


def _direct(spec: DirectResponseSpecModel, where: str) -> DirectResponseSpec:
    body = b""
    if spec.body is not None:
        if spec.body.string is not None and spec.body.bytes is not None:
            raise FieldError(f"{where}.body", "set only one of string and bytes")
        if spec.body.string is not None:
            body = spec.body.string.encode()
        elif spec.body.bytes is not None:
            try:
                body = base64.b64decode(spec.body.bytes, validate=True)
            except (binascii.Error, ValueError):
                raise FieldError(f"{where}.body.bytes", "must be base64") from None
    return DirectResponseSpec(spec.status, body)


def _rule(spec: HTTPRuleSpec, index: int, ns: str, domain: str, warnings: list[str]) -> ParsedRule:
    where = f"spec.http[{index}]"
    if spec.delegate is not None:
        raise FieldError(f"{where}.delegate", "delegate VirtualServices are not supported at a waypoint")
    if spec.cors_policy is not None:
        raise FieldError(f"{where}.corsPolicy", "corsPolicy is not supported by this waypoint")
    answers = [n for n, v in (("route", spec.route), ("redirect", spec.redirect),
                              ("directResponse", spec.direct_response)) if v]
    if len(answers) != 1:
        raise FieldError(where, "set exactly one of route, redirect and directResponse")
    matches = tuple(_match(m, f"{where}.match[{i}]", warnings) for i, m in enumerate(spec.match))
    backends: list[Backend] = []
    for i, dest in enumerate(spec.route):
        weight = dest.weight if dest.weight is not None else (100 if len(spec.route) == 1 else 0)
        try:
            backends.append(_destination(dest.destination, ns, domain, weight, dest.headers))
        except FieldError as exc:
            raise FieldError(f"{where}.route[{i}].{exc.path}", exc.message) from None
    if len(backends) > 1 and any(b.weight > 0 for b in backends):
        backends = [b for b in backends if b.weight > 0]  # Istio drops 0-weight destinations
    mirrors = []
    if spec.mirror is not None:
        pct = _percent(spec.mirror_percentage, spec.mirror_percent)
        mirrors.append(Mirror(_destination(spec.mirror, ns, domain), 100.0 if pct is None else pct))
    for m in spec.mirrors:
        mirrors.append(Mirror(_destination(m.destination, ns, domain),
                              100.0 if m.percentage is None else m.percentage.value))
    action = RouteAction(
        backends=tuple(backends),
        request_headers=_ops(spec.headers.request) if spec.headers else HeaderMutation(),
        response_headers=_ops(spec.headers.response) if spec.headers else HeaderMutation(),
        redirect=_redirect(spec.redirect) if spec.redirect else None,
        rewrite=_rewrite(spec.rewrite, f"{where}.rewrite") if spec.rewrite else None,
        direct_response=_direct(spec.direct_response, f"{where}.directResponse") if spec.direct_response else None,
        mirrors=tuple(mirrors),
        timeout=spec.timeout,
        retry=_retry(spec.retries, f"{where}.retries"),
        fault=_fault(spec.fault, f"{where}.fault"),
        gateway_semantics=False,
    )
    return ParsedRule(index=index, name=spec.name, matches=matches, action=action)


def parse_virtualservice(doc: Any, domain: str = DEFAULT_CLUSTER_DOMAIN) -> ParsedVirtualService:
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    label = "VirtualService {}/{}".format(
        (meta.get("namespace") or "default") if isinstance(meta, dict) else "default",
        meta.get("name", "?") if isinstance(meta, dict) else "?")
    try:
        parsed = VirtualServiceDoc.model_validate(doc)
    except ValidationError as exc:
        raise ResourceError(label, problems_from(exc, VS_MAP_FIELDS)) from None
    ns = parsed.metadata.namespace
    ref = ResourceRef("VirtualService", ns, parsed.metadata.name)
    warnings: list[str] = []
    spec = parsed.spec
    try:
        if not spec.hosts:
            raise FieldError("spec.hosts", "at least one host is required")
        rules = tuple(_rule(r, i, ns, domain, warnings) for i, r in enumerate(spec.http))
    except FieldError as exc:
        raise ResourceError(str(ref), [(exc.path, exc.message)]) from None
    if spec.tcp or spec.tls:
        warnings.append("spec.tcp/spec.tls: not L7; the waypoint ignores them")
    hosts: tuple[str, ...] = tuple(qualify(h, ns, domain) for h in spec.hosts)
    if spec.gateways and "mesh" not in spec.gateways:
        warnings.append("spec.gateways: bound only to gateways, not to 'mesh'; the waypoint ignores it")
        hosts = ()
    return ParsedVirtualService(ref=ref, created=parsed.metadata.created(), hosts=hosts, rules=rules,
                                warnings=tuple(warnings))
