"""One access-log line per finished connection, in ztunnel's field order (text or JSON).

The fields are the ones operators grep for in ztunnel's logs (reference ztunnel.md §6): source and
destination address, workload, namespace and identity, the HBONE address, direction, bytes each way and
duration. Identities appear only when the connection was mutual TLS. A failure is logged at ERROR with an
`error` field; success at INFO.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("access")


@dataclass
class AccessRecord:
    direction: str  # "inbound" | "outbound"
    src_addr: str
    dst_addr: str
    src_workload: str = ""
    src_namespace: str = ""
    src_identity: str = ""
    dst_hbone_addr: str = ""
    dst_service: str = ""
    dst_workload: str = ""
    dst_namespace: str = ""
    dst_identity: str = ""
    bytes_sent: int = 0
    bytes_recv: int = 0
    error: str = ""
    started: float = field(default_factory=time.monotonic)

    def fields(self) -> list[tuple[str, str | int]]:
        out: list[tuple[str, str | int]] = [("src.addr", self.src_addr)]
        for key, val in (
            ("src.workload", self.src_workload),
            ("src.namespace", self.src_namespace),
            ("src.identity", self.src_identity),
        ):
            if val:
                out.append((key, val))
        out.append(("dst.addr", self.dst_addr))
        for key, val in (
            ("dst.hbone_addr", self.dst_hbone_addr),
            ("dst.service", self.dst_service),
            ("dst.workload", self.dst_workload),
            ("dst.namespace", self.dst_namespace),
            ("dst.identity", self.dst_identity),
        ):
            if val:
                out.append((key, val))
        out += [
            ("direction", self.direction),
            ("bytes_sent", self.bytes_sent),
            ("bytes_recv", self.bytes_recv),
            ("duration", f"{(time.monotonic() - self.started) * 1000:.0f}ms"),
        ]
        if self.error:
            out.append(("error", self.error))
        return out


class AccessLog:
    """Writes records as `key=value` text (values quoted like ztunnel's) or as one JSON object per line."""

    def __init__(self, fmt: str = "text", logger: logging.Logger | None = None) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"access log format must be 'text' or 'json', not {fmt!r}")
        self.fmt = fmt
        self.log = logger or log

    def format(self, rec: AccessRecord) -> str:
        fields = rec.fields()
        if self.fmt == "json":
            return json.dumps({"message": "connection complete", **dict(fields)})
        parts = []
        for k, v in fields:
            parts.append(f"{k}={v}" if isinstance(v, int) else f"{k}={json.dumps(v)}")
        return "connection complete " + " ".join(parts)

    def write(self, rec: AccessRecord) -> None:
        self.log.log(logging.ERROR if rec.error else logging.INFO, "%s", self.format(rec))
