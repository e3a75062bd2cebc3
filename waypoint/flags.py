"""Envoy response flags and the local replies that carry them.

Users read `%RESPONSE_FLAGS%` in access logs and the `response_flags` metric label to tell *why* a request
failed (a 503 from a circuit breaker looks nothing like a 503 from a dead pod once the flag says UO or
UH), so every locally generated answer here carries the same flag, body and response-code details that
Envoy would give, and the gRPC form a gRPC client expects (trailers-only, HTTP 200, `grpc-status`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class ResponseFlag(StrEnum):
    """The short codes of `%RESPONSE_FLAGS%`; the value is what the access log prints."""

    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    UPSTREAM_OVERFLOW = "UO"
    NO_ROUTE_FOUND = "NR"
    UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
    NO_CLUSTER_FOUND = "NC"
    DURATION_TIMEOUT = "DT"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    FAILED_LOCAL_HEALTH_CHECK = "LH"
    UPSTREAM_REQUEST_TIMEOUT = "UT"
    LOCAL_RESET = "LR"
    UPSTREAM_REMOTE_RESET = "UR"
    UPSTREAM_CONNECTION_TERMINATION = "UC"
    DELAY_INJECTED = "DI"
    FAULT_INJECTED = "FI"
    RATE_LIMITED = "RL"
    UNAUTHORIZED_EXTERNAL_SERVICE = "UAEX"
    RATELIMIT_SERVICE_ERROR = "RLSE"
    INVALID_ENVOY_REQUEST_HEADERS = "IH"
    STREAM_IDLE_TIMEOUT = "SI"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    UPSTREAM_PROTOCOL_ERROR = "UPE"
    UPSTREAM_MAX_STREAM_DURATION_REACHED = "UMSDR"
    OVERLOAD_MANAGER = "OM"
    DNS_RESOLUTION_FAILURE = "DF"


# Envoy prints flags in this order, joined by commas; "-" when there are none.
_ORDER = {flag: i for i, flag in enumerate(ResponseFlag)}


def render_flags(flags: Iterable[ResponseFlag]) -> str:
    """The `%RESPONSE_FLAGS%` text: `-` for none, else the codes in Envoy's fixed order, comma-joined."""
    unique = sorted(set(flags), key=lambda f: _ORDER[f])
    return ",".join(f.value for f in unique) if unique else "-"


# Envoy's Grpc::Utility::httpToGrpcStatus: what a gRPC client sees for a local HTTP error.
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}

GRPC_STATUS_CODES: dict[str, int] = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


def grpc_percent_encode(message: bytes) -> str:
    """gRPC's `grpc-message` encoding: printable ASCII stays, `%` and everything else becomes %XX."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in message)


def http_to_grpc_status(status: int) -> int:
    return _HTTP_TO_GRPC.get(status, 2)


@dataclass(frozen=True)
class LocalReply:
    """A response the waypoint answers itself, never reaching an upstream.

    `details` is `%RESPONSE_CODE_DETAILS%` (no spaces, as Envoy requires); `grpc_status`, when set, makes
    the gRPC form use that code instead of the one mapped from `status` (fault aborts with `grpcStatus`).
    """

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    flags: frozenset[ResponseFlag] = field(default_factory=frozenset)
    details: str = ""
    grpc_status: int | None = None

    @property
    def flag_text(self) -> str:
        return render_flags(self.flags)

    def with_flags(self, *extra: ResponseFlag) -> LocalReply:
        return LocalReply(self.status, self.body, self.headers, self.flags | frozenset(extra), self.details,
                          self.grpc_status)

    def response_headers(self) -> list[tuple[str, str]]:
        """The headers of the plain HTTP form (content-type text/plain when there is a body)."""
        out = list(self.headers)
        names = {n for n, _ in out}
        if self.body and "content-type" not in names:
            out.append(("content-type", "text/plain"))
        return out

    def grpc_headers(self) -> list[tuple[str, str]]:
        """The trailers-only gRPC form: HTTP 200, `grpc-status` and a percent-encoded `grpc-message`.

        A gRPC client reads nothing but these, so a 503 overflow must arrive as UNAVAILABLE (14), an
        RBAC deny as PERMISSION_DENIED (7), exactly as Envoy's sendLocalReply converts them.
        """
        code = self.grpc_status if self.grpc_status is not None else http_to_grpc_status(self.status)
        out = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", str(code))]
        if self.body:
            out.append(("grpc-message", grpc_percent_encode(self.body)))
        out.extend((n, v) for n, v in self.headers if n not in ("content-type", "grpc-status", "grpc-message"))
        return out


# The bodies users grep for; each is the exact text Envoy sends.
NO_HEALTHY_UPSTREAM_BODY = b"no healthy upstream"
UPSTREAM_TIMEOUT_BODY = b"upstream request timeout"
FAULT_ABORT_BODY = b"fault filter abort"
RBAC_DENIED_BODY = b"RBAC: access denied"


def no_route() -> LocalReply:
    """404 with flag NR: routes are attached to the Service but none matched (Gateway API requires 404)."""
    return LocalReply(404, b"", (), frozenset({ResponseFlag.NO_ROUTE_FOUND}), "route_not_found")


def no_healthy_upstream() -> LocalReply:
    return LocalReply(503, NO_HEALTHY_UPSTREAM_BODY, (), frozenset({ResponseFlag.NO_HEALTHY_UPSTREAM}),
                      "no_healthy_upstream")


def cluster_not_found(status: int = 503) -> LocalReply:
    """A route pointing at a backend that does not exist: 503 NC for Istio routes, 500 for Gateway API."""
    return LocalReply(status, b"", (), frozenset({ResponseFlag.NO_CLUSTER_FOUND}), "cluster_not_found")


def upstream_timeout(per_try: bool = False) -> LocalReply:
    return LocalReply(504, UPSTREAM_TIMEOUT_BODY, (), frozenset({ResponseFlag.UPSTREAM_REQUEST_TIMEOUT}),
                      "upstream_per_try_timeout" if per_try else "upstream_response_timeout")


def overflow() -> LocalReply:
    """Circuit breaker overflow: 503 UO with `x-envoy-overloaded: true`, as Envoy's pool overflow reset."""
    return LocalReply(
        503,
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
        (("x-envoy-overloaded", "true"),),
        frozenset({ResponseFlag.UPSTREAM_OVERFLOW}),
        "upstream_reset_before_response_started{overflow}",
    )


def rbac_denied(policy: str | None) -> LocalReply:
    """403 `RBAC: access denied`; details name the matched DENY policy, or `none` when no ALLOW matched."""
    return LocalReply(403, RBAC_DENIED_BODY, (), frozenset(),
                      f"rbac_access_denied_matched_policy[{policy or 'none'}]")
