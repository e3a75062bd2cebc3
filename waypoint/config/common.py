"""Field types shared by the resource schemas: strict models, enums, durations, names.

The schemas mirror the CRDs users apply, so the same YAML works here and in a cluster. Models forbid
unknown fields (a typo must not silently turn a policy off) and are strict (a number where a string
belongs is an error, not a conversion), except `metadata`, which carries whatever the API server adds.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator
from pydantic.alias_generators import to_camel


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=False, frozen=True,
                              strict=True)


class Metadata(BaseModel):
    """Kubernetes object metadata; the fields the waypoint reads, anything else tolerated."""

    model_config = ConfigDict(extra="allow", alias_generator=to_camel, frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=253)]
    namespace: str = "default"
    generation: int | None = None
    creation_timestamp: Any = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    def created(self) -> dt.datetime | None:
        """creationTimestamp as an aware datetime (YAML may have parsed it already), None if absent."""
        value = self.creation_timestamp
        if value is None:
            return None
        if isinstance(value, dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        if isinstance(value, str):
            try:
                parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                return None
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
        return None


def one_of(*allowed: str) -> AfterValidator:
    """An enum field: exact spelling, and a message listing the choices."""
    choices = ", ".join(allowed)

    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {choices} (got {value!r})")
        return value

    return AfterValidator(check)


# --- durations -------------------------------------------------------------------------------------

_GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_GO_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_gateway_duration(value: Any) -> float:
    """GEP-2257 durations (`1h`, `30s`, `500ms`, `1m30s`), in seconds."""
    if not isinstance(value, str):
        raise ValueError(f"must be a duration string such as '10s' or '500ms' (got {value!r})")
    if not _GATEWAY_DURATION.match(value):
        raise ValueError(f"{value!r} is not a Gateway API duration: use 1-4 parts of digits and h, m, s or ms "
                         "(e.g. '1m30s', '500ms')")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in re.findall(r"([0-9]+)(h|ms|m|s)", value))


def parse_istio_duration(value: Any) -> float:
    """Istio durations: protobuf/Go form (`1.5s`, `100ms`, `1m30s`), in seconds; at least 1ms."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a duration string such as '10s' or '0.5s' (got {value!r})")
    pos = 0
    total = 0.0
    for m in _GO_DURATION_PART.finditer(value):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(value) or pos == 0:
        raise ValueError(f"{value!r} is not a duration: use a number with a unit (h, m, s, ms), e.g. '1.5s'")
    if total < 0.001:
        raise ValueError(f"duration {value!r} must be at least 1ms")
    return total


def parse_istio_duration_or_zero(value: Any) -> float:
    """Like parse_istio_duration, but "0s" is meaningful (a cookie ttl of 0: a session cookie)."""
    if isinstance(value, str) and value.strip("0.") in ("s", "ms", "m", "h"):
        return 0.0
    return parse_istio_duration(value)


GatewayDuration = Annotated[float, PlainValidator(parse_gateway_duration)]
IstioDuration = Annotated[float, PlainValidator(parse_istio_duration)]
IstioDurationOrZero = Annotated[float, PlainValidator(parse_istio_duration_or_zero)]


# --- names ------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _header_name(value: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value


def _header_value(value: str) -> str:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("header values must not contain CR, LF or NUL")
    return value


HeaderName = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_header_name)]
HeaderValue = Annotated[str, Field(max_length=4096), AfterValidator(_header_value)]
Port = Annotated[int, Field(ge=1, le=65535)]
