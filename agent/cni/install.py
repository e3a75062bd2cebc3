"""Putting the plugin into the node's CNI chain, as istio-cni's installer does.

The container runtime reads the lexicographically first network configuration in its conf directory
(`*.conflist`, `*.conf`, `*.json`) and runs its plugins in order. The primary CNI writes that file; this
installer appends a `nodemesh-cni` entry to its `plugins` (turning a single-plugin `.conf` into a
`.conflist`, which chaining needs), and copies the plugin executable into the bin directory. It changes
nothing when both are already as wanted, so it can run at every agent start and again whenever the
primary CNI rewrites its file.

The plugin's kubeconfig (for deciding about pods while the agent is down) is written next to the
network configuration as JSON, mode 0600: it carries a bearer token. Runtimes ignore files with other
extensions, so it is never mistaken for a network.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.cni import plugin

PLUGIN_TYPE = "nodemesh-cni"
KUBECONFIG_NAME = "nodemesh-cni.kubeconfig"
CONF_SUFFIXES = (".conflist", ".conf", ".json")


class CniInstallError(Exception):
    """The plugin could not be put into the chain; the message says which file and why."""


@dataclass(frozen=True)
class PluginSettings:
    """Our entry in the chain."""

    agent_socket: str = plugin.DEFAULT_SOCKET
    timeout_seconds: float = plugin.DEFAULT_TIMEOUT
    exclude_namespaces: tuple[str, ...] = plugin.DEFAULT_EXCLUDED
    kubeconfig: str | None = None

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": PLUGIN_TYPE, "agentSocket": self.agent_socket,
                               "timeoutSeconds": self.timeout_seconds,
                               "excludeNamespaces": list(self.exclude_namespaces)}
        if self.kubeconfig:
            out["kubeconfig"] = self.kubeconfig
        return out


@dataclass
class InstallResult:
    conf_file: Path
    binary: Path
    changed: list[str] = field(default_factory=list)


def write_atomic(path: Path, data: bytes, mode: int) -> bool:
    """Replace `path` in one step (the runtime may read it at any moment); False when it already held
    exactly this."""
    with contextlib.suppress(OSError):
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def primary_config(conf_dir: Path) -> Path:
    """The file the runtime uses: the first network configuration by name."""
    try:
        names = sorted(p for p in conf_dir.iterdir() if p.suffix in CONF_SUFFIXES and p.is_file())
    except FileNotFoundError:
        raise CniInstallError(f"CNI conf dir {conf_dir} does not exist") from None
    if not names:
        raise CniInstallError(f"no network configuration in {conf_dir} yet: the primary CNI must be installed first")
    return names[0]


def chained(conf: dict[str, Any], settings: PluginSettings) -> dict[str, Any]:
    """The configuration with our entry last (and only once); sans-IO."""
    if "plugins" in conf:
        if not isinstance(conf["plugins"], list) or not conf["plugins"]:
            raise CniInstallError("plugins: expected a non-empty list")
        out = dict(conf)
        plugins = [p for p in conf["plugins"] if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    else:
        if "type" not in conf:
            raise CniInstallError("neither plugins nor type: not a CNI network configuration")
        single = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
        out = {"cniVersion": conf.get("cniVersion", "0.3.1"), "name": conf.get("name", "k8s-pod-network")}
        plugins = [single]
    if not plugins:
        raise CniInstallError("the configuration holds only nodemesh-cni: there is no primary plugin to chain to")
    out["plugins"] = [*plugins, settings.entry()]
    return out


def unchained(conf: dict[str, Any]) -> dict[str, Any]:
    out = dict(conf)
    out["plugins"] = [p for p in conf.get("plugins", []) if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    return out


def plugin_source(interpreter: str = "/usr/bin/env python3") -> bytes:
    """The plugin as one executable file: its module source with the interpreter line to use on the host."""
    text = Path(plugin.__file__).read_text()
    lines = text.splitlines(keepends=True)
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    return f"#!{interpreter}\n".encode() + "".join(lines).encode()


def install(bin_dir: str | os.PathLike[str], conf_dir: str | os.PathLike[str], settings: PluginSettings, *,
            interpreter: str = "/usr/bin/env python3") -> InstallResult:
    bin_path = Path(bin_dir) / PLUGIN_TYPE
    conf_dir = Path(conf_dir)
    target = primary_config(conf_dir)
    try:
        conf = json.loads(target.read_text())
    except (OSError, ValueError) as err:
        raise CniInstallError(f"{target}: cannot read it as JSON: {err}") from None
    if not isinstance(conf, dict):
        raise CniInstallError(f"{target}: not a JSON object")
    try:
        new = chained(conf, settings)
    except CniInstallError as err:
        raise CniInstallError(f"{target}: {err}") from None
    result = InstallResult(conf_file=target, binary=bin_path)
    # The executable first: a chain naming a plugin the runtime cannot find fails every pod.
    if write_atomic(bin_path, plugin_source(interpreter), 0o755):
        result.changed.append(str(bin_path))
    out_path = target if target.suffix == ".conflist" else target.with_suffix(".conflist")
    if write_atomic(out_path, (json.dumps(new, indent=2) + "\n").encode(), 0o644):
        result.changed.append(str(out_path))
    if out_path != target:
        target.unlink()  # the .conf became a .conflist; keeping both would make two networks
        result.changed.append(f"removed {target}")
    result.conf_file = out_path
    return result


def uninstall(bin_dir: str | os.PathLike[str], conf_dir: str | os.PathLike[str]) -> list[str]:
    removed = []
    for path in sorted(Path(conf_dir).glob("*.conflist")):
        with contextlib.suppress(OSError, ValueError):
            conf = json.loads(path.read_text())
            if isinstance(conf, dict) and any(isinstance(p, dict) and p.get("type") == PLUGIN_TYPE
                                              for p in conf.get("plugins", [])):
                write_atomic(path, (json.dumps(unchained(conf), indent=2) + "\n").encode(), 0o644)
                removed.append(str(path))
    for path in (Path(bin_dir) / PLUGIN_TYPE, Path(conf_dir) / KUBECONFIG_NAME):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(str(path))
    return removed


def plugin_kubeconfig(server: str, *, token: str | None = None, ca_pem: str | None = None) -> dict[str, Any]:
    import base64

    cluster: dict[str, Any] = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem.encode()).decode()
    user = {"token": token} if token else {}
    return {"apiVersion": "v1", "kind": "Config", "current-context": "nodemesh-cni",
            "clusters": [{"name": "nodemesh-cni", "cluster": cluster}],
            "users": [{"name": "nodemesh-cni", "user": user}],
            "contexts": [{"name": "nodemesh-cni", "context": {"cluster": "nodemesh-cni", "user": "nodemesh-cni"}}]}


def write_plugin_kubeconfig(conf_dir: str | os.PathLike[str], server: str, *, token: str | None = None,
                            ca_pem: str | None = None) -> Path:
    path = Path(conf_dir) / KUBECONFIG_NAME
    write_atomic(path, json.dumps(plugin_kubeconfig(server, token=token, ca_pem=ca_pem)).encode(), 0o600)
    return path


def excluded(value: str | Sequence[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(i.strip() for i in items if i.strip())
