"""Shared field types for config documents and the translation of pydantic errors into field paths.

Every parser here validates with pydantic and reports problems as `path: cause`, the path spelled the way
the user wrote the document (`workloads[2].workloadIps[0]`, `services["ns/host"][80]`), never pydantic's
internal tuple form, so a user can find the line to fix.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError
from pydantic.alias_generators import to_camel

from mesh.config.errors import ConfigError
from mesh.config.model import (
    IPAddress,
    IPNetwork,
    NamespacedHostname,
    NetworkAddress,
    ServiceAccountMatch,
    StringMatch,
)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class StrictModel(BaseModel):
    """camelCase on the wire, unknown fields refused (as serde's `deny_unknown_fields`)."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=False,
        frozen=True,
        str_strip_whitespace=False,
    )


# --- error paths --------------------------------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    """Strip Annotated/Optional so the structural type (model, list, dict) shows."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _field_type(model: Any, name: str) -> Any:
    for fname, info in model.model_fields.items():
        if name in (fname, info.alias):
            return info.annotation
    return None


def render_path(loc: tuple[int | str, ...], root: str = "", model: Any = None) -> str:
    """`a.b[2]["key"]` from pydantic's location tuple. With the model, dict keys are told apart from
    field names by walking the model's types; without it, strings are shown as fields."""
    out = root
    tp: Any = model
    for part in loc:
        if part == "[key]":
            continue
        tp = _unwrap(tp)
        origin = get_origin(tp)
        is_model = isinstance(tp, type) and issubclass(tp, BaseModel)
        if origin is dict:
            out += f"[{part}]" if isinstance(part, int) or str(part).isdigit() else f"[{json.dumps(part)}]"
            tp = get_args(tp)[1] if get_args(tp) else None
        elif isinstance(part, int):
            out += f"[{part}]"
            tp = get_args(tp)[0] if origin is list and get_args(tp) else None
        elif is_model or _IDENT.match(part):
            out += f".{part}" if out else part
            tp = _field_type(tp, part) if is_model else None
        else:
            out += f"[{json.dumps(part)}]"
            tp = None
    return out


def _describe(err: Any) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        ctx = err.get("ctx") or {}
        cause = ctx.get("error")
        if cause is not None:
            return str(cause)
    msg = err.get("msg", "invalid value")
    if "input" in err and kind not in ("value_error",):
        shown = repr(err["input"])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return f"{msg[0].lower()}{msg[1:]} (got {shown})"
    return msg


def config_error(exc: ValidationError, root: str = "", model: Any = None) -> ConfigError:
    problems = [(render_path(tuple(e["loc"]), root, model), _describe(e)) for e in exc.errors()]
    return ConfigError(problems)


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Any, root: str = "") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, root, model) from None


def load_document(text: str | bytes, what: str) -> Any:
    """Parse YAML (a superset of JSON), reporting the line and column of a syntax error."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError("", f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("", f"{what} is not valid YAML/JSON{where}: {problem}") from None


def load_documents(text: str | bytes, what: str) -> list[Any]:
    """All documents of a YAML stream (`---` separated), empty documents skipped."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError("", f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("", f"{what} is not valid YAML{where}: {problem}") from None


# --- scalar parsers (each raises ValueError with a message meant for the user) ------------------------


def parse_ip(value: Any) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IP address (expected a string)")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def parse_cidr(value: Any) -> IPNetwork:
    """A CIDR (`10.0.0.0/8`) or a single address (a /32 or /128), host bits allowed as Istio does."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not an IP address or CIDR block")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR block") from None


def parse_port(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a port number")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise ValueError(f"{value!r} is not a port number")
    if not 1 <= value <= 65535:
        raise ValueError(f"{value} is not a port number (1-65535)")
    return value


def parse_network_address(value: Any) -> NetworkAddress:
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"{value!r} is not a network address: expected '<network>/<ip>', e.g. '/10.96.0.10'")
    network, _, ip = value.partition("/")
    try:
        return NetworkAddress(network, ipaddress.ip_address(ip))
    except ValueError:
        raise ValueError(f"{value!r} is not a network address: {ip!r} is not an IP address") from None


def parse_namespaced_hostname(value: Any) -> NamespacedHostname:
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"{value!r} is not a namespaced hostname: expected '<namespace>/<hostname>'")
    ns, _, host = value.partition("/")
    if not ns or not host:
        raise ValueError(f"{value!r} is not a namespaced hostname: expected '<namespace>/<hostname>'")
    return NamespacedHostname(ns, host)


def parse_gateway_destination(value: Any) -> NetworkAddress | NamespacedHostname:
    """ztunnel's untagged form: "network/ip" when the second part is an IP, else "namespace/hostname"."""
    try:
        return parse_network_address(value)
    except ValueError:
        pass
    try:
        return parse_namespaced_hostname(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a gateway destination: expected '<network>/<ip>' or '<namespace>/<hostname>'"
        ) from None


_MATCH_KINDS = {"exact": StringMatch.exact, "prefix": StringMatch.prefix, "suffix": StringMatch.suffix}


def parse_string_match(value: Any) -> StringMatch:
    """Either Istio's wildcard string or ztunnel's tagged form ({Exact: x}, {Prefix: x}, {Presence: []})."""
    if isinstance(value, StringMatch):
        return value
    if isinstance(value, str):
        return StringMatch.from_istio(value)
    if isinstance(value, dict) and len(value) == 1:
        ((tag, arg),) = value.items()
        kind = str(tag).lower()
        if kind == "presence":
            return StringMatch.presence()
        if kind in _MATCH_KINDS:
            if not isinstance(arg, str):
                raise ValueError(f"{tag} needs a string, got {arg!r}")
            return _MATCH_KINDS[kind](arg)
    raise ValueError(
        f"{value!r} is not a string match: use a string ('x', 'x*', '*x', '*') or one of "
        "{Exact: x}, {Prefix: x}, {Suffix: x}, {Presence: []}"
    )


def parse_service_account_match(value: Any) -> ServiceAccountMatch:
    if isinstance(value, ServiceAccountMatch):
        return value
    if isinstance(value, str):
        ns, sep, sa = value.partition("/")
        if sep and ns and sa and "/" not in sa:
            return ServiceAccountMatch(ns, sa)
    if isinstance(value, dict) and set(value) == {"namespace", "serviceAccount"}:
        ns, sa = value["namespace"], value["serviceAccount"]
        if isinstance(ns, str) and isinstance(sa, str) and ns and sa:
            return ServiceAccountMatch(ns, sa)
    raise ValueError(
        f"{value!r} is not a service account match: expected 'namespace/name' or "
        "{namespace: ..., serviceAccount: ...}"
    )


def _plain(fn: Callable[[Any], Any]) -> PlainValidator:
    return PlainValidator(fn)


IPField = Annotated[IPAddress, _plain(parse_ip)]
CIDRField = Annotated[IPNetwork, _plain(parse_cidr)]
PortField = Annotated[int, _plain(parse_port)]
NetworkAddressField = Annotated[NetworkAddress, _plain(parse_network_address)]
GatewayDestinationField = Annotated[NetworkAddress | NamespacedHostname, _plain(parse_gateway_destination)]
StringMatchField = Annotated[StringMatch, _plain(parse_string_match)]
ServiceAccountMatchField = Annotated[ServiceAccountMatch, _plain(parse_service_account_match)]


def enum_parser(enum_cls: Any, what: str) -> PlainValidator:
    """Case-insensitive enum values, accepting both `Healthy` and `HEALTHY` spellings."""
    by_folded = {}
    for member in enum_cls:
        by_folded[member.value.lower()] = member
        by_folded[member.name.lower().replace("_", "")] = member

    def parse(value: Any) -> Any:
        if isinstance(value, enum_cls):
            return value
        if isinstance(value, str):
            found = by_folded.get(value.lower().replace("_", ""))
            if found is not None:
                return found
        allowed = ", ".join(m.value for m in enum_cls)
        raise ValueError(f"{value!r} is not a valid {what} (one of: {allowed})")

    return PlainValidator(parse)
