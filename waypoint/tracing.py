"""Trace context propagation (W3C `traceparent`, Zipkin B3, `x-request-id`) and optional OTLP export.

In ambient mode the waypoint makes the one application-level span of a hop (ztunnel makes none). Per
request it continues the client's trace (or starts one, sampled at `sampling` percent: Istio's default
is 1%), makes its own span id the parent of the upstream request, keeps B3 headers consistent when the
client uses them, and generates `x-request-id` when it is missing (Envoy does, and access logs and traces
are joined on it). With an OTLP endpoint configured, sampled spans are exported through the
OpenTelemetry SDK (HTTP/protobuf), batched off the hot path.
"""

from __future__ import annotations

import logging
import random
import re
import uuid
from dataclasses import dataclass
from typing import Any

from waypoint.record import RequestRecord
from waypoint.routing import Headers

log = logging.getLogger("waypoint.tracing")

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_HEX = re.compile(r"^[0-9a-f]+$")
B3_HEADERS = ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3")


@dataclass(slots=True)
class TraceContext:
    trace_id: str  # 32 hex
    span_id: str  # ours, 16 hex
    parent_span_id: str | None
    sampled: bool
    b3: bool  # the client uses B3 multi-headers: keep them consistent
    span: Any = None  # the OpenTelemetry span when exporting

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid W3C traceparent, else None."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip())
    if m is None or m.group(1) == "ff" or set(m.group(2)) == {"0"} or set(m.group(3)) == {"0"}:
        return None
    return m.group(2), m.group(3), bool(int(m.group(4), 16) & 1)


def _b3(headers: Headers) -> tuple[str, str, bool | None] | None:
    trace = headers.get("x-b3-traceid")
    span = headers.get("x-b3-spanid")
    if not trace or not span:
        return None
    trace, span = trace.lower(), span.lower()
    if len(trace) not in (16, 32) or len(span) != 16 or not _HEX.match(trace + span):
        return None
    sampled_h = headers.get("x-b3-sampled")
    sampled = None if sampled_h is None else sampled_h in ("1", "true", "d")
    if headers.get("x-b3-flags") == "1":
        sampled = True
    return trace.rjust(32, "0"), span, sampled


class Tracer:
    def __init__(self, *, sampling: float = 1.0, otlp_endpoint: str | None = None, service_name: str = "waypoint",
                 rng: random.Random | None = None, exporter: Any = None) -> None:
        if not 0 <= sampling <= 100:
            raise ValueError(f"sampling must be a percentage within 0..100, got {sampling}")
        self.sampling = sampling
        self.rng = rng or random.Random()
        self._otel = None
        self._provider = None
        if otlp_endpoint or exporter is not None:
            self._setup_otel(otlp_endpoint, service_name, exporter)

    def _setup_otel(self, endpoint: str | None, service_name: str, exporter: Any) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = endpoint.rstrip("/") if endpoint else ""
            if url and not url.endswith("/v1/traces"):
                url += "/v1/traces"
            exporter = OTLPSpanExporter(endpoint=url, timeout=5)
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        self._provider = provider
        self._otel = provider.get_tracer("nodemesh.waypoint")

    @property
    def exporting(self) -> bool:
        return self._otel is not None

    def start(self, headers: Headers, start_ns: int, name: str) -> TraceContext:
        """Continue (or start) the trace for a request; mutates nothing."""
        rng = self.rng
        parent = parse_traceparent(headers.get("traceparent"))
        b3 = _b3(headers)
        if parent is not None:
            trace_id, parent_id, sampled = parent
        elif b3 is not None:
            trace_id, parent_id, b3_sampled = b3
            sampled = b3_sampled if b3_sampled is not None else rng.random() * 100 < self.sampling
        else:
            trace_id, parent_id = f"{rng.getrandbits(128):032x}", None
            sampled = self.sampling > 0 and rng.random() * 100 < self.sampling
        ctx = TraceContext(trace_id, f"{rng.getrandbits(64):016x}", parent_id, sampled, b3 is not None)
        if sampled and self._otel is not None:
            ctx.span = self._start_span(ctx, start_ns, name)
        return ctx

    def _start_span(self, ctx: TraceContext, start_ns: int, name: str) -> Any:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

        parent_ctx = None
        if ctx.parent_span_id is not None:
            remote = SpanContext(int(ctx.trace_id, 16), int(ctx.parent_span_id, 16), is_remote=True,
                                 trace_flags=TraceFlags(TraceFlags.SAMPLED))
            parent_ctx = trace.set_span_in_context(NonRecordingSpan(remote))
        else:
            # A new trace: make the SDK use our trace id by parenting on a synthetic remote context.
            remote = SpanContext(int(ctx.trace_id, 16), self.rng.getrandbits(64) or 1, is_remote=True,
                                 trace_flags=TraceFlags(TraceFlags.SAMPLED))
            parent_ctx = trace.set_span_in_context(NonRecordingSpan(remote))
        assert self._otel is not None
        span = self._otel.start_span(name, context=parent_ctx, kind=SpanKind.SERVER, start_time=start_ns)
        ctx.span_id = f"{span.get_span_context().span_id:016x}"
        return span

    def propagate(self, ctx: TraceContext, headers: Headers) -> None:
        """Write the upstream trace headers: our span is the parent of the upstream's."""
        headers.set("traceparent", ctx.traceparent)
        if ctx.b3:
            headers.set("x-b3-traceid", ctx.trace_id if len(headers.get("x-b3-traceid") or "") == 32
                        else ctx.trace_id[16:])
            headers.set("x-b3-spanid", ctx.span_id)
            if ctx.parent_span_id:
                headers.set("x-b3-parentspanid", ctx.parent_span_id)
            headers.set("x-b3-sampled", "1" if ctx.sampled else "0")

    def finish(self, ctx: TraceContext | None, rec: RequestRecord, end_ns: int) -> None:
        if ctx is None or ctx.span is None:
            return
        span = ctx.span
        try:
            span.set_attribute("http.method", rec.method)
            span.set_attribute("http.url", f"http://{rec.authority}{rec.path}")
            span.set_attribute("http.protocol", rec.protocol)
            span.set_attribute("http.status_code", rec.response_code)
            span.set_attribute("response_flags", rec.flag_text)
            span.set_attribute("guid:x-request-id", rec.request_id or "")
            span.set_attribute("upstream_cluster", rec.upstream_cluster or "-")
            span.set_attribute("upstream_cluster.name", rec.upstream_cluster or "-")
            span.set_attribute("istio.canonical_service", rec.destination.canonical_service)
            span.set_attribute("istio.namespace", rec.destination_service_namespace)
            span.set_attribute("peer.address", rec.downstream_remote_address or "-")
            if rec.response_code >= 500 or rec.response_code == 0:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=end_ns)
        except Exception:  # telemetry must never fail a request
            log.exception("ending a span failed")

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


def ensure_request_id(headers: Headers) -> str:
    """`x-request-id`, generated (UUID4) when the client sent none, as Envoy does."""
    value = headers.get("x-request-id")
    if not value:
        value = str(uuid.uuid4())
        headers.set("x-request-id", value)
    return value
