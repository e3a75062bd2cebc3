"""Config errors that name the resource and the field, the way a user can find the line to fix.

A rejected resource is reported as `HTTPRoute default/r1: spec.rules[0].matches[1].path.type: must be
one of Exact, PathPrefix, RegularExpression` - the kind and name, the path spelled as in the YAML, the
cause. The same text goes into the resource's status condition and the waypoint's log.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError


class FieldError(ValueError):
    """A problem at one field path; converters raise it, `ResourceError` collects it."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class ResourceError(ValueError):
    """A resource was refused. `problems` lists (path, message) pairs; `resource` is `Kind ns/name`."""

    def __init__(self, resource: str, problems: list[tuple[str, str]]) -> None:
        self.resource = resource
        self.problems = problems or [("", "invalid resource")]
        super().__init__(self.render())

    def render(self) -> str:
        parts = [f"{p}: {m}" if p else m for p, m in self.problems]
        head = f"{self.resource}: " if self.resource else ""
        if len(parts) == 1:
            return head + parts[0]
        return f"{head}{len(parts)} problems: " + "; ".join(parts)

    @property
    def path(self) -> str:
        return self.problems[0][0]

    @property
    def message(self) -> str:
        return self.problems[0][1]


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def render_loc(loc: tuple[int | str, ...], map_keys: frozenset[int] = frozenset()) -> str:
    """pydantic's location tuple as `spec.rules[0].matches[1].path.type` (map keys in brackets)."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i in map_keys or not _IDENT.match(part):
            out += f'["{part}"]'
        else:
            out += f".{part}" if out else part
    return out


_TYPE_MESSAGES = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false",
    "float_type": "must be a number",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "missing": "required field is missing",
    "extra_forbidden": "unknown field",
}


def describe_error(err: Any) -> str:
    kind = err.get("type", "")
    if kind in ("value_error", "assertion_error"):
        cause = (err.get("ctx") or {}).get("error")
        if cause is not None:
            return str(cause)
    text = _TYPE_MESSAGES.get(kind)
    if text is None:
        msg = err.get("msg", "invalid value")
        text = msg[:1].lower() + msg[1:]
    if kind not in ("missing", "extra_forbidden") and "input" in err:
        shown = repr(err["input"])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        text += f" (got {shown})"
    return text


def _map_key_positions(loc: tuple[int | str, ...], map_fields: frozenset[str]) -> frozenset[int]:
    return frozenset(i for i in range(1, len(loc)) if loc[i - 1] in map_fields and isinstance(loc[i], str))


def problems_from(exc: ValidationError, map_fields: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        # A map field's key names the user's entry (a header, a label), not a schema field.
        keys = _map_key_positions(loc, map_fields)
        out.append((render_loc(loc, keys), describe_error(err)))
    return out
