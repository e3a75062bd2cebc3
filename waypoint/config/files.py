"""Config from files: the same YAML users `kubectl apply`, one or many documents per file.

A directory is read in name order (`*.yaml`, `*.yml`, `*.json`); `kind: List` wrappers are unwrapped.
A YAML syntax error is reported with its file, line and column; the documents before it in that file
still apply. `sync_paths` makes the store hold exactly what the files say (a resource removed from the
files is removed from the waypoint), `apply_paths` only adds and updates.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from waypoint.config.store import ApplyResult, ConfigStore, Outcome

SUFFIXES = (".yaml", ".yml", ".json")


def config_files(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES))
        else:
            out.append(path)
    return out


def read_documents(path: Path) -> Iterator[Any | ApplyResult]:
    """Each document of `path`, or a rejected ApplyResult for what could not be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        yield ApplyResult(None, Outcome.REJECTED, f"{path}: cannot read: {exc}")
        return
    try:
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                yield doc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        yield ApplyResult(None, Outcome.REJECTED, f"{path}: not valid YAML{where}: {problem}")


def _load(paths: Iterable[str | Path]) -> tuple[list[Any], list[ApplyResult]]:
    docs: list[Any] = []
    errors: list[ApplyResult] = []
    for path in config_files(paths):
        for item in read_documents(path):
            (errors if isinstance(item, ApplyResult) else docs).append(item)
    return docs, errors


def apply_paths(store: ConfigStore, paths: Iterable[str | Path]) -> list[ApplyResult]:
    docs, errors = _load(paths)
    return errors + store.apply_all(docs)


def sync_paths(store: ConfigStore, paths: Iterable[str | Path]) -> list[ApplyResult]:
    docs, errors = _load(paths)
    if errors:
        # A file that does not parse must not make its resources vanish: apply what parsed, delete nothing.
        return errors + store.apply_all(docs)
    return store.sync(docs)
