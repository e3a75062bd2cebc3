"""Label and field selectors: parsing the query strings clients send, and matching objects against them.

Sans-IO: plain functions over strings and dicts. The grammar is the real server's: labels accept
`k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k>n`, `k<n`; fields accept `=`, `==` and
`!=` with backslash escapes. A selector that does not parse is a 400 naming the offending requirement.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.kube.apiserver.errors import bad_request

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_key_error(key: str) -> str | None:
    """Why `key` is not a valid label key (`[prefix/]name`), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _PREFIX.match(prefix)):
        return f"prefix part of {key!r} must be a DNS subdomain"
    if not name or len(name) > 63 or not _NAME.match(name):
        return (f"name part of {key!r} must be 63 characters or less, alphanumeric at both ends, "
                "with '-', '_' or '.' between")
    return None


def label_value_error(value: str) -> str | None:
    if len(value) > 63 or not _VALUE.match(value):
        return f"{value!r} must be 63 characters or less, empty or alphanumeric at both ends with '-', '_' or '.'"
    return None


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # exists, !exists, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        has = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return has
        if self.op == "!exists":
            return not has
        if self.op in ("=", "in"):
            return has and value in self.values
        if self.op in ("!=", "notin"):
            return not has or value not in self.values
        if not has:
            return False
        try:
            number = int(str(value))
        except ValueError:
            return False
        bound = int(self.values[0])
        return number > bound if self.op == "gt" else number < bound


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels if isinstance(labels, Mapping) else {}
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


_SET_RE = re.compile(r"^\s*(?P<key>[^\s!=<>(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*$")
_CMP_RE = re.compile(r"^\s*(?P<key>[^\s!=<>(),]+)\s*(?P<op>==|=|!=|>|<)\s*(?P<value>[^\s!=<>(),]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(?P<neg>!?)\s*(?P<key>[^\s!=<>(),]+)\s*$")


def _requirement(text: str) -> Requirement:
    def check_key(key: str) -> str:
        err = label_key_error(key)
        if err:
            raise bad_request(f"unable to parse requirement: {text.strip()!r}: invalid label key: {err}")
        return key

    def check_value(value: str) -> str:
        err = label_value_error(value)
        if err:
            raise bad_request(f"unable to parse requirement: {text.strip()!r}: invalid label value: {err}")
        return value

    if m := _SET_RE.match(text):
        values = tuple(check_value(v.strip()) for v in m["values"].split(",")) if m["values"].strip() else ()
        if not values:
            raise bad_request(f"unable to parse requirement: {text.strip()!r}: for 'in', 'notin' operators, "
                              "values set can't be empty")
        return Requirement(check_key(m["key"]), m["op"], values)
    if m := _CMP_RE.match(text):
        op = {"==": "=", "=": "=", "!=": "!=", ">": "gt", "<": "lt"}[m["op"]]
        if op in ("gt", "lt"):
            try:
                int(m["value"])
            except ValueError:
                raise bad_request(f"unable to parse requirement: {text.strip()!r}: "
                                  f"for 'Gt', 'Lt' operators, the value must be an integer") from None
        return Requirement(check_key(m["key"]), op, (check_value(m["value"]),))
    if m := _EXISTS_RE.match(text):
        return Requirement(check_key(m["key"]), "!exists" if m["neg"] else "exists")
    raise bad_request(f"unable to parse requirement: {text.strip()!r}: expected a label selector requirement "
                      "like 'k=v', 'k!=v', 'k in (a,b)', 'k notin (a)', 'k' or '!k'")


def parse_label_selector(text: str | None) -> LabelSelector:
    if text is None or not text.strip():
        return LabelSelector()
    return LabelSelector(tuple(_requirement(part) for part in _split_top_level(text)))


def selector_from_match_labels(labels: Mapping[str, str]) -> LabelSelector:
    """A Service's `spec.selector` as a selector (equality on every pair)."""
    return LabelSelector(tuple(Requirement(k, "=", (v,)) for k, v in sorted(labels.items())))


# --- field selectors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    op: str  # = or !=
    value: str


@dataclass(frozen=True)
class FieldSelector:
    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        for r in self.requirements:
            actual = field_value(obj, r.field)
            if (actual == r.value) != (r.op == "="):
                return False
        return True

    @property
    def empty(self) -> bool:
        return not self.requirements


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string a field selector compares against: '' when missing, 'true'/'false' for booleans."""
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, buf, escaped = [], [], False
    for ch in text:
        if escaped:
            buf.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    if escaped:
        buf.append("\\")
    parts.append("".join(buf))
    return parts


def _unescape(text: str) -> str:
    out, escaped = [], False
    for ch in text:
        if escaped:
            if ch not in "\\,=":
                raise bad_request(f"invalid field selector escape sequence: \\{ch}")
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    if escaped:
        raise bad_request("invalid field selector: trailing backslash")
    return "".join(out)


def parse_field_selector(text: str | None, allowed: Callable[[str], bool] | None = None) -> FieldSelector:
    """Parse `a=b,c!=d`; `allowed(field)` rejects fields the resource type does not index (400, as real)."""
    if text is None or not text.strip():
        return FieldSelector()
    reqs = []
    for raw in _split_unescaped(text, ","):
        part = raw.strip()
        if not part:
            continue
        m = re.match(r"^([^=!\s]+)\s*(==|=|!=)\s*(.*)$", part)
        if not m:
            raise bad_request(f"invalid field selector: {part!r}: expected 'field=value' or 'field!=value'")
        field, op, value = m.group(1), "!=" if m.group(2) == "!=" else "=", _unescape(m.group(3).strip())
        if allowed is not None and not allowed(field):
            raise bad_request(f'field label not supported: {field}')
        reqs.append(FieldRequirement(field, op, value))
    return FieldSelector(tuple(reqs))


def compile_selectors(label_text: str | None, field_text: str | None,
                      allowed: Callable[[str], bool] | None = None) -> tuple[LabelSelector, FieldSelector]:
    """Both selectors of a request; raises ApiError 400 on the first that does not parse."""
    return parse_label_selector(label_text), parse_field_selector(field_text, allowed)
