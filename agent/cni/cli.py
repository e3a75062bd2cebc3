"""`nodemesh cni install|uninstall|show`: the plugin in a node's CNI chain, by hand.

The agent keeps the plugin installed by itself when run with `--cni-bin-dir/--cni-conf-dir`; these
commands are for nodes prepared by other means (an image, a configuration manager) and for taking the
plugin out again, which makes new pods start without waiting for the agent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.cni import plugin
from agent.cni.install import CniInstallError, PluginSettings, excluded, install, primary_config, uninstall


def cmd_install(args: argparse.Namespace) -> int:
    settings = PluginSettings(agent_socket=args.agent_socket, timeout_seconds=args.timeout,
                              exclude_namespaces=excluded(args.exclude_namespaces), kubeconfig=args.kubeconfig)
    try:
        result = install(args.bin_dir, args.conf_dir, settings, interpreter=args.interpreter)
    except (CniInstallError, OSError) as e:
        print(f"nodemesh cni: {e}", file=sys.stderr)
        return 2
    print(f"{result.binary}\n{result.conf_file}" + ("" if result.changed else " (unchanged)"))
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    for path in uninstall(args.bin_dir, args.conf_dir):
        print(path)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    try:
        path = primary_config(Path(args.conf_dir))
        print(path)
        print(json.dumps(json.loads(path.read_text()), indent=2))
    except (CniInstallError, OSError, ValueError) as e:
        print(f"nodemesh cni: {e}", file=sys.stderr)
        return 2
    return 0


def register(subparsers: Any) -> None:
    cni = subparsers.add_parser("cni", help="the chained CNI plugin that holds new pods until they are captured")
    sub = cni.add_subparsers(dest="cni_command", required=True)
    for name, func, text in (("install", cmd_install, "copy the plugin and chain it into the network config"),
                             ("uninstall", cmd_uninstall, "take the plugin out of the chain and remove it"),
                             ("show", cmd_show, "print the network config the runtime uses")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--conf-dir", default="/etc/cni/net.d")
        if name != "show":
            p.add_argument("--bin-dir", default="/opt/cni/bin")
        if name == "install":
            p.add_argument("--agent-socket", default=plugin.DEFAULT_SOCKET)
            p.add_argument("--timeout", type=float, default=plugin.DEFAULT_TIMEOUT,
                           help="seconds an ADD waits for the agent (default: %(default)s)")
            p.add_argument("--exclude-namespaces", default=",".join(plugin.DEFAULT_EXCLUDED))
            p.add_argument("--kubeconfig", help="API access for the plugin while the agent is down (JSON kubeconfig)")
            p.add_argument("--interpreter", default="/usr/bin/env python3",
                           help="the plugin's interpreter line (default: %(default)s)")
        p.set_defaults(func=func)
