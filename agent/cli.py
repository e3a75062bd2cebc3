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
        print("nodemesh agent: give at least one --config (kube, lab:NAME, file:PATH or policies:PATH)",
              file=sys.stderr)
        return 2
    if bool(args.ca_creds) == bool(args.ca_token):
        print("nodemesh agent: give either --ca-creds (a node certificate) or --ca-token with --ca-roots",
              file=sys.stderr)
        return 2
    if args.ca_token and not args.ca_roots:
        print("nodemesh agent: --ca-token needs --ca-roots (the CA's root certificate, PEM)", file=sys.stderr)
        return 2
    if bool(args.cni_bin_dir) != bool(args.cni_conf_dir):
        print("nodemesh agent: --cni-bin-dir and --cni-conf-dir go together", file=sys.stderr)
        return 2
    cfg = AgentConfig(
        node=args.node, config=args.config, ca_url=args.ca_url, ca_creds=args.ca_creds, ca_token=args.ca_token,
        ca_roots=args.ca_roots, trust_domain=args.trust_domain, redirect=args.redirect,
        bpffs_root=args.bpffs_root, state_dir=args.state_dir, metrics_addr=args.metrics_addr,
        readiness_addr=args.readiness_addr, admin_addr=args.admin_addr, log_format=args.log_format,
        drain_seconds=args.drain, node_addresses=tuple(args.node_address or ()), cert_ttl=args.cert_ttl,
        kubeconfig=args.kubeconfig, host_proc=args.host_proc, cni_socket=args.cni_socket or None,
        cni_bin_dir=args.cni_bin_dir, cni_conf_dir=args.cni_conf_dir,
        cni_exclude=tuple(n.strip() for n in args.cni_exclude_namespaces.split(",") if n.strip()),
        cni_interpreter=args.cni_interpreter,
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
                   help="config source, repeatable: kube (the Kubernetes API server), lab:NAME, "
                        "file:PATH (ztunnel local config), policies:PATH")
    p.add_argument("--ca-url", required=True, help="https://HOST:PORT of the CA")
    p.add_argument("--ca-creds", type=Path, help="directory written by 'nodemesh ca issue-node'")
    p.add_argument("--ca-token", type=Path,
                   help="instead of --ca-creds: a service-account token file (CA run with --auth tokenreview)")
    p.add_argument("--ca-roots", type=Path, help="with --ca-token: the CA's root certificate (PEM)")
    p.add_argument("--trust-domain", default="cluster.local",
                   help="with --ca-token: the mesh's trust domain (default: %(default)s)")
    p.add_argument("--kubeconfig", help="with --config kube: API server access (default: in-cluster, then "
                                        "$KUBECONFIG, then ~/.kube/config)")
    p.add_argument("--host-proc", default="/proc",
                   help="the host's /proc, where pod network namespaces are found (default: %(default)s)")
    p.add_argument("--cni-socket", default="/var/run/nodemesh/cni.sock",
                   help="with --config kube: the socket the chained CNI plugin calls ('' for none)")
    p.add_argument("--cni-bin-dir", help="install the CNI plugin executable here (e.g. the host's /opt/cni/bin)")
    p.add_argument("--cni-conf-dir", help="chain the plugin into the network config here (e.g. /etc/cni/net.d)")
    p.add_argument("--cni-exclude-namespaces", default="kube-system",
                   help="namespaces the plugin never holds up (comma-separated; default: %(default)s)")
    p.add_argument("--cni-interpreter", default="/usr/bin/env python3",
                   help="the interpreter line of the installed plugin (default: %(default)s)")
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
