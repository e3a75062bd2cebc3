"""`nodemesh agent`: run the node agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from agent.app import AgentConfig, run_agent
from agent.privileges import missing_capabilities


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: use HOST:PORT")
    return host or "0.0.0.0", int(port)


def cmd_agent(args: argparse.Namespace) -> int:
    if args.log_format == "json":
        logging.getLogger().handlers[0].setFormatter(_JsonFormatter())
    backend = "nftables" if args.redirect == "nftables" else "ebpf"
    missing = missing_capabilities(backend)
    if missing and args.redirect != "auto":
        name, why = next(iter(missing.items()))
        print(f"nodemesh agent: missing capability CAP_{name}, needed for {why}", file=sys.stderr)
        return 2
    if not args.config:
        print("nodemesh agent: give at least one --config (lab:NAME, file:PATH or policies:PATH)", file=sys.stderr)
        return 2
    cfg = AgentConfig(
        node=args.node, config=args.config, ca_url=args.ca_url, ca_creds=args.ca_creds, redirect=args.redirect,
        bpffs_root=args.bpffs_root, state_dir=args.state_dir, metrics_addr=args.metrics_addr,
        readiness_addr=args.readiness_addr, admin_addr=args.admin_addr, log_format=args.log_format,
        drain_seconds=args.drain, node_addresses=tuple(args.node_address or ()), cert_ttl=args.cert_ttl,
    )
    try:
        return asyncio.run(run_agent(cfg))
    except (ValueError, OSError) as e:
        print(f"nodemesh agent: {e}", file=sys.stderr)
        return 2


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        return json.dumps({"time": self.formatTime(record), "level": record.levelname.lower(),
                           "target": record.name, "message": record.getMessage()})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("agent", help="run the node agent")
    p.add_argument("--node", required=True, help="this node's name (pods' spec.nodeName)")
    p.add_argument("--config", action="append", default=[],
                   help="config source, repeatable: lab:NAME, file:PATH (ztunnel local config), policies:PATH")
    p.add_argument("--ca-url", required=True, help="https://HOST:PORT of the CA")
    p.add_argument("--ca-creds", required=True, type=Path, help="directory written by 'nodemesh ca issue-node'")
    p.add_argument("--redirect", choices=["auto", "ebpf", "nftables"], default="auto")
    p.add_argument("--bpffs-root", default="/sys/fs/bpf/nodemesh")
    p.add_argument("--state-dir", default="/run/nodemesh/redirect")
    p.add_argument("--metrics-addr", type=_hostport, default=("0.0.0.0", 15020))
    p.add_argument("--readiness-addr", type=_hostport, default=("0.0.0.0", 15021))
    p.add_argument("--admin-addr", type=_hostport, default=("127.0.0.1", 15000))
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--drain", type=float, default=5.0, help="seconds to let connections finish on shutdown")
    p.add_argument("--node-address", action="append",
                   help="source address of the node's own probes, never captured (repeatable)")
    p.add_argument("--cert-ttl", type=float, help="ask for workload certificates of this lifetime (seconds)")
    p.set_defaults(func=cmd_agent)
