"""The access log, in Istio's default TEXT format (and its JSON variant), one line per request.

The format is the one users already grep and parse (istio `EnvoyTextLogFormat`):

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
    %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS%
    "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
    %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%"
    "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS%
    %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%

(on one line). Unset values print `-`. Lines are buffered and flushed at least once a second, as Envoy's
file sink does, so the log costs little on the hot path.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

from waypoint.record import RequestRecord


def format_start_time(epoch: float) -> str:
    """Envoy's default `%START_TIME%`: `2024-05-01T12:34:56.789Z` (UTC, milliseconds)."""
    t = time.gmtime(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(epoch * 1000) % 1000:03d}Z"


def _d(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def text_line(r: RequestRecord) -> str:
    return (
        f'[{format_start_time(r.start_time)}] "{r.method} {r.path} {r.protocol}" {r.response_code} {r.flag_text} '
        f'{_d(r.details)} {_d(r.termination_details)} "{_d(r.transport_failure)}" {r.bytes_received} '
        f'{r.bytes_sent} {r.duration_ms} {_d(r.upstream_service_time)} "{_d(r.forwarded_for)}" '
        f'"{_d(r.user_agent)}" "{_d(r.request_id)}" "{_d(r.authority)}" "{_d(r.upstream_host)}" '
        f"{_d(r.upstream_cluster)} {_d(r.upstream_local_address)} {_d(r.downstream_local_address)} "
        f"{_d(r.downstream_remote_address)} - {_d(r.route_name)}\n"
    )


def json_line(r: RequestRecord) -> str:
    """Istio's JSON access log keys (`EnvoyJSONLogFormatIstio`)."""
    doc = {
        "start_time": format_start_time(r.start_time),
        "method": r.method,
        "path": r.path,
        "protocol": r.protocol,
        "response_code": r.response_code,
        "response_flags": r.flag_text,
        "response_code_details": _d(r.details),
        "connection_termination_details": r.termination_details if r.termination_details != "-" else None,
        "upstream_transport_failure_reason": r.transport_failure,
        "bytes_received": r.bytes_received,
        "bytes_sent": r.bytes_sent,
        "duration": r.duration_ms,
        "upstream_service_time": r.upstream_service_time,
        "x_forwarded_for": r.forwarded_for,
        "user_agent": r.user_agent,
        "request_id": r.request_id,
        "authority": r.authority,
        "upstream_host": r.upstream_host,
        "upstream_cluster": r.upstream_cluster,
        "upstream_local_address": r.upstream_local_address,
        "downstream_local_address": r.downstream_local_address,
        "downstream_remote_address": r.downstream_remote_address,
        "requested_server_name": None,
        "route_name": r.route_name,
    }
    return json.dumps(doc, separators=(",", ":")) + "\n"


class AccessLog:
    """Formats records and writes them to `sink` (stdout by default); `enabled=False` turns it off."""

    def __init__(self, sink: TextIO | Callable[[str], object] | None = None, *, json_format: bool = False,
                 enabled: bool = True) -> None:
        self.enabled = enabled
        self.format = json_line if json_format else text_line
        target = sink if sink is not None else sys.stdout
        self._write: Callable[[str], object] = target.write if hasattr(target, "write") else target  # type: ignore
        self._flush: Callable[[], object] | None = getattr(target, "flush", None)

    def log(self, record: RequestRecord) -> None:
        if self.enabled:
            self._write(self.format(record))

    def flush(self) -> None:
        if self._flush is not None:
            with contextlib.suppress(OSError, ValueError):
                self._flush()
