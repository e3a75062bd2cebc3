"""The three patch formats the real server accepts: JSON patch, JSON merge patch and strategic merge patch.

Sans-IO: each takes the current object and the decoded patch and returns a new object, never changing its
inputs. Strategic merge is the format kubectl uses for built-in types (`apply`, `edit`); lists are merged
by the type's patch merge keys (containers by name, ports by port...) and the `$patch`, `$retainKeys`,
`$setElementOrder/` and `$deleteFromPrimitiveList/` directives are honoured, as kubectl's three-way patches
contain them. Custom resources only take JSON and merge patches, like the real server.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from mesh.kube.apiserver.errors import ApiError, bad_request

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


def _invalid(message: str) -> ApiError:
    return ApiError(422, "Invalid", message)


# --- JSON patch (RFC 6902) ------------------------------------------------------------------------


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise bad_request(f"json patch: path {path!r} is not a JSON pointer (it must start with '/')")
    if path == "":
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> tuple[Any, str]:
    cur = doc
    for part in parts[:-1]:
        if isinstance(cur, dict):
            if part not in cur:
                raise _invalid(f"json patch: path {path!r}: {part!r} does not exist")
            cur = cur[part]
        elif isinstance(cur, list):
            cur = cur[_index(cur, part, path, allow_end=False)]
        else:
            raise _invalid(f"json patch: path {path!r}: {part!r} is not inside an object or array")
    return cur, parts[-1]


def _index(seq: list[Any], part: str, path: str, allow_end: bool) -> int:
    if part == "-" and allow_end:
        return len(seq)
    if not part.isdigit() or (len(part) > 1 and part.startswith("0")):
        raise _invalid(f"json patch: path {path!r}: {part!r} is not an array index")
    i = int(part)
    if i > len(seq) or (i == len(seq) and not allow_end):
        raise _invalid(f"json patch: path {path!r}: index {i} is out of range")
    return i


def _get(doc: Any, path: str) -> Any:
    cur = doc
    for part in _pointer(path):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list):
            cur = cur[_index(cur, part, path, allow_end=False)]
        else:
            raise _invalid(f"json patch: path {path!r} does not exist")
    return cur


def _add(doc: Any, path: str, value: Any) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent, last = _parent(doc, parts, path)
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, path, allow_end=True), value)
    else:
        raise _invalid(f"json patch: path {path!r}: parent is not an object or array")
    return doc


def _remove(doc: Any, path: str) -> tuple[Any, Any]:
    parts = _pointer(path)
    if not parts:
        raise _invalid("json patch: cannot remove the whole document")
    parent, last = _parent(doc, parts, path)
    if isinstance(parent, dict):
        if last not in parent:
            raise _invalid(f"json patch: remove: path {path!r} does not exist")
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(parent, last, path, allow_end=False))
    raise _invalid(f"json patch: path {path!r}: parent is not an object or array")


def json_patch(obj: Mapping[str, Any], ops: Any) -> dict[str, Any]:
    if not isinstance(ops, list):
        raise bad_request("json patch: the body must be a JSON array of operations")
    doc: Any = copy.deepcopy(dict(obj))
    for n, op in enumerate(ops):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"json patch: operation {n} must be an object with 'op' and 'path'")
        kind, path = op["op"], op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise bad_request(f"json patch: operation {n} ({kind}) has no 'value'")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            doc, _ = _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            doc, _ = _remove(doc, path) if _pointer(path) else (doc, None)
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind in ("move", "copy"):
            src = op.get("from")
            if not isinstance(src, str):
                raise bad_request(f"json patch: operation {n} ({kind}) has no 'from'")
            if kind == "move":
                doc, value = _remove(doc, src)
            else:
                value = copy.deepcopy(_get(doc, src))
            doc = _add(doc, path, value)
        elif kind == "test":
            if _get(doc, path) != op["value"]:
                raise _invalid(f"json patch: test operation {n} failed at {path!r}")
        else:
            raise bad_request(f"json patch: operation {n}: unknown op {kind!r}")
    if not isinstance(doc, dict):
        raise _invalid("json patch: the result is not an object")
    return doc


# --- JSON merge patch (RFC 7386) ------------------------------------------------------------------


def merge_patch(obj: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(obj) if isinstance(obj, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# --- strategic merge patch ------------------------------------------------------------------------


class StrategicMerge:
    """Applies a strategic merge patch with the merge keys of one resource type (see kinds.ResourceType)."""

    def __init__(self, merge_keys: Mapping[str, str], merge_sets: frozenset[str] | set[str]) -> None:
        self.merge_keys = merge_keys
        self.merge_sets = merge_sets

    def apply(self, obj: Mapping[str, Any], patch: Any) -> dict[str, Any]:
        if not isinstance(patch, dict):
            raise bad_request("strategic merge patch: the body must be a JSON object")
        result = self._map(copy.deepcopy(dict(obj)), patch, "")
        if result is None:
            raise _invalid("strategic merge patch: the patch deletes the whole object")
        return result

    def _map(self, orig: dict[str, Any], patch: Mapping[str, Any], path: str) -> dict[str, Any] | None:
        directive = patch.get("$patch")
        if directive == "delete":
            return None
        if directive == "replace":
            return self._strip(patch)
        if directive is not None:
            raise bad_request(f"strategic merge patch: unknown $patch directive {directive!r} at {path or '.'}")
        retain = patch.get("$retainKeys")
        if retain is not None:
            if not isinstance(retain, list):
                raise bad_request(f"strategic merge patch: $retainKeys at {path or '.'} must be a list")
            orig = {k: v for k, v in orig.items() if k in retain}
        orders: dict[str, list[Any]] = {}
        removals: dict[str, list[Any]] = {}
        for key, value in patch.items():
            if key in ("$patch", "$retainKeys"):
                continue
            if key.startswith("$setElementOrder/"):
                orders[key.split("/", 1)[1]] = value if isinstance(value, list) else []
                continue
            if key.startswith("$deleteFromPrimitiveList/"):
                removals[key.split("/", 1)[1]] = value if isinstance(value, list) else []
                continue
            sub = f"{path}.{key}" if path else key
            if value is None:
                orig.pop(key, None)
            elif isinstance(value, dict):
                current = orig.get(key)
                merged = self._map(current if isinstance(current, dict) else {}, value, sub)
                if merged is None:
                    orig.pop(key, None)
                else:
                    orig[key] = merged
            elif isinstance(value, list):
                orig[key] = self._list(orig.get(key), value, sub)
            else:
                orig[key] = copy.deepcopy(value)
        for key, values in removals.items():
            if isinstance(orig.get(key), list):
                orig[key] = [v for v in orig[key] if v not in values]
        for key, order in orders.items():
            if isinstance(orig.get(key), list):
                orig[key] = self._reorder(orig[key], order, self.merge_keys.get(f"{path}.{key}" if path else key))
        return orig

    def _strip(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._strip(v) for k, v in value.items() if not k.startswith("$")}
        if isinstance(value, list):
            return [self._strip(v) for v in value]
        return copy.deepcopy(value)

    def _list(self, orig: Any, patch: list[Any], path: str) -> list[Any]:
        if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
            return [self._strip(i) for i in patch if not (isinstance(i, dict) and i.get("$patch") == "replace")]
        current = list(orig) if isinstance(orig, list) else []
        key = self.merge_keys.get(path)
        if key:
            for item in patch:
                if not isinstance(item, dict):
                    raise bad_request(f"strategic merge patch: {path}: items must be objects keyed by {key!r}")
                if key not in item:
                    raise bad_request(f"strategic merge patch: {path}: an item has no merge key {key!r}")
                at = next((i for i, c in enumerate(current) if isinstance(c, dict) and c.get(key) == item[key]), None)
                if item.get("$patch") == "delete":
                    current = [c for c in current if not (isinstance(c, dict) and c.get(key) == item[key])]
                elif at is None:
                    current.append(self._strip(item))
                else:
                    merged = self._map(copy.deepcopy(current[at]), item, path)
                    if merged is not None:
                        current[at] = merged
            return current
        if path in self.merge_sets:
            for item in patch:
                if item not in current:
                    current.append(copy.deepcopy(item))
            return current
        return [self._strip(i) for i in patch]

    @staticmethod
    def _reorder(items: list[Any], order: list[Any], key: str | None) -> list[Any]:
        def ident(item: Any) -> Any:
            return item.get(key) if key and isinstance(item, dict) else item

        wanted = [o.get(key) if key and isinstance(o, dict) else o for o in order]
        ranked = sorted(enumerate(items), key=lambda p: (wanted.index(ident(p[1])) if ident(p[1]) in wanted
                                                         else len(wanted) + p[0]))
        return [item for _, item in ranked]
