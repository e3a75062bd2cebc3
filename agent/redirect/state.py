"""The agent's on-disk memory of which pods it redirects, for re-adoption after a restart.

The kernel keeps the steering (pinned links, rules, nftables tables) across an agent
restart, but not *why*: which pod, which exclusions, which sysctl values were there
before. One small JSON file per pod under the state directory (tmpfs, like bpffs, so
both vanish together on reboot) keeps that. Files are written atomically with mode 0600;
they hold no secrets, but nothing outside the agent has a reason to read them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from agent.redirect.exclusions import CaptureExclusions
from agent.redirect.model import RedirectError

VERSION = 1
SUFFIX = ".json"


@dataclass
class PodRecord:
    uid: str
    netns_path: str | None  # None when the namespace was given as an fd
    netns_cookie: int
    netns_ino: int
    ip: IPv4Address
    eth0: str
    backend: str
    name: str = ""
    namespace: str = ""
    exclusions: CaptureExclusions = field(default_factory=CaptureExclusions)
    node_addresses: tuple[IPv4Network, ...] = ()
    pin_path: str | None = None
    sysctls_before: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "uid": self.uid,
            "name": self.name,
            "namespace": self.namespace,
            "netns": self.netns_path,
            "netnsCookie": self.netns_cookie,
            "netnsIno": self.netns_ino,
            "ip": str(self.ip),
            "eth0": self.eth0,
            "backend": self.backend,
            "exclusions": self.exclusions.to_json(),
            "nodeAddresses": [str(n) for n in self.node_addresses],
            "pinPath": self.pin_path,
            "sysctlsBefore": self.sysctls_before,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PodRecord:
        if data.get("version") != VERSION:
            raise ValueError(f"unknown state version {data.get('version')!r}")
        return cls(
            uid=str(data["uid"]),
            name=str(data.get("name", "")),
            namespace=str(data.get("namespace", "")),
            netns_path=data.get("netns"),
            netns_cookie=int(data["netnsCookie"]),
            netns_ino=int(data["netnsIno"]),
            ip=IPv4Address(data["ip"]),
            eth0=str(data["eth0"]),
            backend=str(data["backend"]),
            exclusions=CaptureExclusions.from_json(data.get("exclusions", {})),
            node_addresses=tuple(IPv4Network(n) for n in data.get("nodeAddresses", [])),
            pin_path=data.get("pinPath"),
            sysctls_before={str(k): int(v) for k, v in (data.get("sysctlsBefore") or {}).items()},
        )


def _path(state_dir: str, uid: str) -> str:
    return os.path.join(state_dir, urllib.parse.quote(uid, safe="") + SUFFIX)


def save(state_dir: str, record: PodRecord) -> None:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".tmp-", suffix=SUFFIX)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(record.to_json(), fh, indent=1, sort_keys=True)
        os.replace(tmp, _path(state_dir, record.uid))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load(state_dir: str, uid: str) -> PodRecord | None:
    path = _path(state_dir, uid)
    try:
        with open(path) as fh:
            return PodRecord.from_json(json.load(fh))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise RedirectError(f"state file {path} is unreadable: {exc}") from None


def delete(state_dir: str, uid: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(state_dir, uid))


def load_all(state_dir: str) -> tuple[list[PodRecord], list[str]]:
    """Every readable record, plus one message per file that could not be read."""
    records: list[PodRecord] = []
    problems: list[str] = []
    if not os.path.isdir(state_dir):
        return records, problems
    for entry in sorted(os.listdir(state_dir)):
        if not entry.endswith(SUFFIX) or entry.startswith("."):
            continue
        path = os.path.join(state_dir, entry)
        try:
            with open(path) as fh:
                records.append(PodRecord.from_json(json.load(fh)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path}: {exc}")
    return records, problems
