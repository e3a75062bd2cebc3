"""Per-pod capture exclusions, read from the annotations Istio users already write.

Istio's sidecar injector honours ``traffic.sidecar.istio.io/*`` annotations; ambient Istio
does not (istio/istio#49829 is still open), and users keep asking for them. nodemesh
honours the four that make sense for an in-pod capture:

==============================================  =============================================
annotation                                      meaning here
==============================================  =============================================
``traffic.sidecar.istio.io/excludeInboundPorts``    ports whose inbound connections reach the app directly
``traffic.sidecar.istio.io/excludeOutboundPorts``   destination ports the pod reaches directly
``traffic.sidecar.istio.io/excludeOutboundIPRanges`` destination CIDRs the pod reaches directly
``traffic.sidecar.istio.io/includeOutboundIPRanges`` if set and not ``*``: only these are captured
==============================================  =============================================

Values are comma-separated, as in Istio. IPv6 entries are accepted and ignored, since the
capture is IPv4 only. A bad value is an :class:`ExclusionError` naming the annotation and the
offending entry, never a half-applied set.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"

ANNOTATIONS = (
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_IP_RANGES,
    INCLUDE_OUTBOUND_IP_RANGES,
)

Port = Annotated[int, Field(ge=1, le=65535)]


class ExclusionError(ValueError):
    """An annotation value could not be parsed; ``annotation`` names which one."""

    def __init__(self, annotation: str, message: str) -> None:
        self.annotation = annotation
        super().__init__(f"annotation {annotation}: {message}")


class CaptureExclusions(BaseModel):
    """What of a pod's TCP is *not* captured. The defaults capture everything."""

    model_config = ConfigDict(frozen=True)

    inbound_ports: frozenset[Port] = frozenset()
    outbound_ports: frozenset[Port] = frozenset()
    outbound_cidrs: tuple[IPv4Network, ...] = ()
    #: ``None`` captures every destination; otherwise only these (includeOutboundIPRanges).
    capture_cidrs: tuple[IPv4Network, ...] | None = None

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str] | None) -> CaptureExclusions:
        annotations = annotations or {}
        return cls(
            inbound_ports=frozenset(_ports(annotations, EXCLUDE_INBOUND_PORTS)),
            outbound_ports=frozenset(_ports(annotations, EXCLUDE_OUTBOUND_PORTS)),
            outbound_cidrs=tuple(_cidrs(annotations, EXCLUDE_OUTBOUND_IP_RANGES, allow_star=False) or ()),
            capture_cidrs=_cidrs(annotations, INCLUDE_OUTBOUND_IP_RANGES, allow_star=True),
        )

    def to_json(self) -> dict[str, object]:
        return {
            "inboundPorts": sorted(self.inbound_ports),
            "outboundPorts": sorted(self.outbound_ports),
            "outboundCidrs": [str(n) for n in self.outbound_cidrs],
            "captureCidrs": None if self.capture_cidrs is None else [str(n) for n in self.capture_cidrs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> CaptureExclusions:
        cap = data.get("captureCidrs")
        return cls(
            inbound_ports=frozenset(data.get("inboundPorts", ())),  # type: ignore[arg-type]
            outbound_ports=frozenset(data.get("outboundPorts", ())),  # type: ignore[arg-type]
            outbound_cidrs=tuple(IPv4Network(str(n)) for n in data.get("outboundCidrs", ())),  # type: ignore[union-attr]
            capture_cidrs=None if cap is None else tuple(IPv4Network(str(n)) for n in cap),  # type: ignore[union-attr]
        )


def _entries(annotations: Mapping[str, str], key: str) -> list[str]:
    raw = annotations.get(key)
    if raw is None:
        return []
    if not isinstance(raw, str):
        raise ExclusionError(key, f"value must be a string, got {type(raw).__name__}")
    return [e.strip() for e in raw.split(",") if e.strip()]


def _ports(annotations: Mapping[str, str], key: str) -> list[int]:
    out: list[int] = []
    for entry in _entries(annotations, key):
        if not entry.isdigit():
            raise ExclusionError(key, f"{entry!r} is not a port number")
        port = int(entry)
        if not 1 <= port <= 65535:
            raise ExclusionError(key, f"port {port} is outside 1-65535")
        out.append(port)
    return out


def _cidrs(annotations: Mapping[str, str], key: str, allow_star: bool) -> tuple[IPv4Network, ...] | None:
    entries = _entries(annotations, key)
    if key not in annotations:
        return None
    if allow_star and entries == ["*"]:
        return None
    out: list[IPv4Network] = []
    for entry in entries:
        if entry == "*":
            raise ExclusionError(key, "'*' must be the only entry")
        try:
            net = ip_network(entry, strict=False)
        except ValueError:
            raise ExclusionError(key, f"{entry!r} is not an IP range in CIDR form") from None
        if isinstance(net, IPv6Network):
            continue  # capture is IPv4 only; an IPv6 entry has nothing to exclude
        out.append(net)
    return tuple(out)
