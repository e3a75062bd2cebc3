"""``nodemesh redirect``: see and clean up pod traffic redirection, for operators.

::

    nodemesh redirect show NETNS [--json]     what is installed in one pod namespace
    nodemesh redirect list [--json]           pods the agent's state directory knows
    nodemesh redirect cleanup NETNS           remove all redirection from one namespace
    nodemesh redirect cleanup --stale         remove pins and records of vanished namespaces

NETNS is a path (``/run/netns/x``, ``/proc/<pid>/ns/net``) or an ``ip netns`` name. Errors
are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from agent.redirect import state as st
from agent.redirect.cleanup import cleanup_netns, cleanup_stale
from agent.redirect.model import DEFAULT_BPFFS_ROOT, DEFAULT_STATE_DIR, RedirectError
from agent.redirect.status import inspect_netns
from mesh.netns import NetnsError, netns_cookie, open_netns


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``redirect`` command group to ``nodemesh``'s subparsers."""
    p = subparsers.add_parser("redirect", help="inspect and clean up pod traffic redirection")
    sub = p.add_subparsers(dest="redirect_command", metavar="COMMAND")
    sub.required = True

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bpffs-root", default=DEFAULT_BPFFS_ROOT, help="where the agent pins its links")
        sp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the agent's redirect state directory")

    s = sub.add_parser("show", help="what is installed in a pod namespace")
    s.add_argument("netns", help="namespace path or ip-netns name")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    common(s)
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("list", help="pods the agent's state directory knows")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    common(s)
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("cleanup", help="remove leftovers of a crashed agent")
    target = s.add_mutually_exclusive_group(required=True)
    target.add_argument("netns", nargs="?", help="remove all redirection from this namespace")
    target.add_argument("--stale", action="store_true", help="remove pins and records of vanished namespaces")
    common(s)
    s.set_defaults(func=cmd_cleanup)
    return p


def _fail(msg: str) -> int:
    print(f"nodemesh redirect: {msg}", file=sys.stderr)
    return 2


def _root_check() -> str | None:
    if os.geteuid() != 0:
        return "this command needs root (it enters network namespaces and reads eBPF objects)"
    return None


def cmd_show(args: argparse.Namespace) -> int:
    if (err := _root_check()) is not None:
        return _fail(err)
    try:
        status = inspect_netns(args.netns, bpffs_root=args.bpffs_root, state_dir=args.state_dir)
    except (NetnsError, RedirectError, OSError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        print(status.render())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    records, problems = st.load_all(args.state_dir)
    rows: list[dict[str, Any]] = []
    for rec in records:
        alive: bool | None = None
        if rec.netns_path is not None:
            try:
                fd = open_netns(rec.netns_path)
            except NetnsError:
                alive = False
            else:
                try:
                    alive = netns_cookie(fd) == rec.netns_cookie
                finally:
                    os.close(fd)
        rows.append({**rec.to_json(), "netnsAlive": alive})
    if args.json:
        print(json.dumps({"pods": rows, "unreadable": problems}, indent=2))
        return 0
    if not rows:
        print(f"no pods in {args.state_dir}")
    for r in rows:
        alive_txt = {True: "alive", False: "GONE", None: "given as fd"}[r["netnsAlive"]]
        label = f"{r['namespace']}/{r['name']}" if r["name"] else r["uid"]
        print(f"{label:<32} {r['ip']:<15} {r['backend']:<9} netns {r['netns'] or '-'} ({alive_txt})")
    for p in problems:
        print(f"unreadable: {p}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    if (err := _root_check()) is not None:
        return _fail(err)
    try:
        if args.stale:
            removed = cleanup_stale(args.bpffs_root, args.state_dir)
        else:
            removed = cleanup_netns(args.netns, args.bpffs_root, args.state_dir)
            remaining = inspect_netns(args.netns, bpffs_root=args.bpffs_root, state_dir=args.state_dir)
            for lv in remaining.listeners:
                owners = ", ".join(lv.owners) or "unknown"
                print(f"still listening: {lv.address}:{lv.port} held by {owners} (stop that process to free it)")
    except (NetnsError, RedirectError, OSError) as exc:
        return _fail(str(exc))
    if not removed:
        print("nothing to clean up")
    for line in removed:
        print(f"removed {line}")
    return 0
