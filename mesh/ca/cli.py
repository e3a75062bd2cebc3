"""``nodemesh ca ...``: create a CA, issue node certificates, serve the signing API, request a certificate.

``register(subparsers)`` adds the group; the ``nodemesh`` command finds it through the
``nodemesh.commands`` entry point. Every handler returns an exit code and turns expected failures (bad
input, missing files, refusals) into one line on stderr, exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from mesh.ca.api import DEFAULT_SERVER_NAME
from mesh.ca.authority import DEFAULT_NODE_TTL, DEFAULT_WORKLOAD_TTL, CertificateAuthority, NodeCredentials
from mesh.ca.client import CAClient, CAClientError
from mesh.ca.placement import PlacementError, placement_from_spec
from mesh.identity import IdentityError, SpiffeId
from mesh.identity.spiffe import DEFAULT_TRUST_DOMAIN


class UsageError(Exception):
    """A command-line value is wrong; the message names the option."""


def parse_listen(value: str, option: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise UsageError(f"{option} {value!r}: expected HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"{option} {value!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"{option} {value!r}: port must be 0-65535")
    return host, number


def _ttl(seconds: float | None, default: timedelta, option: str = "--ttl") -> timedelta:
    if seconds is None:
        return default
    if seconds < 1:
        raise UsageError(f"{option} must be at least 1 second, got {seconds}")
    return timedelta(seconds=seconds)


def _fingerprint(cert: Any) -> str:
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)).upper()


def cmd_init(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.init_dir(args.dir, args.trust_domain)
    print(f"CA for trust domain {ca.trust_domain} created in {args.dir}")
    print(f"  root SHA-256 fingerprint {_fingerprint(ca.root_cert)}")
    print("  root-key.pem is needed only to re-issue the intermediate: keep it offline")
    return 0


def cmd_issue_node(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.ca_dir)
    creds = ca.issue_node(args.node, _ttl(args.ttl, DEFAULT_NODE_TTL))
    cert_path, key_path, roots_path = creds.write_files(args.out)
    print(f"node certificate for {creds.node} (expires {creds.not_after.isoformat()}):")
    print(f"  {cert_path}\n  {key_path} (0600)\n  {roots_path}")
    return 0


async def _serve(args: argparse.Namespace) -> int:
    from mesh.ca.server import CAServer

    ca = CertificateAuthority.load(args.ca_dir)
    host, port = parse_listen(args.listen)
    kube = args.placement == "kube" or args.auth == "tokenreview"
    if (args.trusted_agents or args.token_audience or args.workload_tokens) and args.auth != "tokenreview":
        raise UsageError("--trusted-agents and --token-audience need --auth tokenreview")
    if args.kubeconfig and not kube:
        raise UsageError("--kubeconfig is only used with --placement kube or --auth tokenreview")
    api = None
    placement: Any = None
    authenticator = None
    if kube:
        from mesh.ca.kube import (
            DEFAULT_AUDIENCE,
            DEFAULT_TRUSTED_AGENTS,
            KubeApi,
            KubePodPlacement,
            TokenReviewAuthenticator,
            load_configuration,
        )

        api = KubeApi(await load_configuration(args.kubeconfig))
    try:
        if args.placement == "kube":
            assert api is not None
            placement = KubePodPlacement(api, ca.trust_domain)
            placement.start()
        else:
            placement = placement_from_spec(args.placement, ca.trust_domain)
        if args.auth == "tokenreview":
            assert api is not None
            authenticator = TokenReviewAuthenticator(
                api, trusted_agents=args.trusted_agents or DEFAULT_TRUSTED_AGENTS,
                audience=args.token_audience or DEFAULT_AUDIENCE,
                pods=placement if isinstance(placement, KubePodPlacement) else None,
                workload_tokens=args.workload_tokens)
        return await _run_server(args, CAServer(ca, placement, ttl=_ttl(args.ttl, DEFAULT_WORKLOAD_TTL),
                                                server_names=args.server_name or [DEFAULT_SERVER_NAME],
                                                authenticator=authenticator), host, port)
    finally:
        if placement is not None and hasattr(placement, "stop"):
            await placement.stop()
        if api is not None:
            await api.close()


async def _run_server(args: argparse.Namespace, server: Any, host: str, port: int) -> int:
    ca, placement = server.ca, server.placement
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        bound = await server.start(host, port)
        print(f"CA {ca.trust_domain} serving on https://{args.listen.rpartition(':')[0]}:{bound}"
              f" (placement {placement.describe()}, auth {args.auth})", flush=True)
        if args.metrics:
            mhost, mport = parse_listen(args.metrics, "--metrics")
            mbound = await server.start_metrics(mhost, mport)
            print(f"metrics on http://{args.metrics.rpartition(':')[0]}:{mbound}/metrics", flush=True)
        await stop.wait()
    finally:
        await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


async def _request(args: argparse.Namespace) -> int:
    identity = SpiffeId.parse(args.identity)
    creds: Any
    if args.token_file:
        from mesh.ca.kube import TokenCredentials

        if not args.ca_roots:
            raise UsageError("--token-file needs --ca-roots (the CA's root certificate, PEM)")
        creds = TokenCredentials.read(args.token_file, args.ca_roots)
    else:
        creds = NodeCredentials.read_files(args.node_creds)
    ttl = _ttl(args.ttl, DEFAULT_WORKLOAD_TTL) if args.ttl is not None else None
    async with CAClient(args.ca_url, creds, server_name=args.server_name) as client:
        cert = await client.fetch(identity, ttl)
    cert_path, key_path, roots_path = cert.write_files(args.out)
    print(f"{identity} (expires {cert.not_after.isoformat()}):\n  {cert_path}\n  {key_path} (0600)\n  {roots_path}")
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    return asyncio.run(_request(args))


def _guard(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (UsageError, IdentityError, PlacementError, CAClientError, ValueError) as exc:
            print(f"nodemesh ca: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"nodemesh ca: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130

    return run


def register(subparsers: Any) -> None:
    """Add the ``ca`` subcommand group to the ``nodemesh`` parser."""
    ca = subparsers.add_parser("ca", help="the mesh certificate authority")
    sub = ca.add_subparsers(dest="ca_command", required=True)

    p = sub.add_parser("init", help="create a root and a signing intermediate in DIR (keys 0600)")
    p.add_argument("dir", type=Path)
    p.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="default: %(default)s")
    p.set_defaults(func=_guard(cmd_init))

    p = sub.add_parser("issue-node", help="issue the client certificate a node agent uses with the CA")
    p.add_argument("node", help="the node's name, as pods' spec.nodeName")
    p.add_argument("--ca-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="directory for cert-chain.pem, key.pem, root-cert.pem")
    p.add_argument("--ttl", type=float, help=f"seconds (default {int(DEFAULT_NODE_TTL.total_seconds())})")
    p.set_defaults(func=_guard(cmd_issue_node))

    p = sub.add_parser("serve", help="serve the signing API over mutual TLS")
    p.add_argument("--ca-dir", required=True, type=Path)
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--placement", required=True,
                   help="where pods run: lab:NAME, file:PATH, or kube (pods' spec.nodeName, from the API server)")
    p.add_argument("--auth", choices=("node-cert", "tokenreview"), default="node-cert",
                   help="how agents authenticate: a node certificate from this CA (mutual TLS, the default), "
                        "or their service-account token checked with TokenReview")
    p.add_argument("--kubeconfig", type=Path,
                   help="API server access for kube/tokenreview (default: in-cluster, then $KUBECONFIG)")
    p.add_argument("--trusted-agents", metavar="NS/SA,...",
                   help="service accounts whose tokens may ask for certificates "
                        "(default nodemesh-system/nodemesh-agent)")
    p.add_argument("--token-audience", help="the audience agents' tokens must be for (default nodemesh-ca)")
    p.add_argument("--workload-tokens", action="store_true",
                   help="with --auth tokenreview: any other service account may obtain its own identity "
                        "(and only that), e.g. waypoints; off by default")
    p.add_argument("--ttl", type=float, help="workload certificate lifetime in seconds (default 86400)")
    p.add_argument("--metrics", "--metrics-listen", dest="metrics", help="HOST:PORT for plain-HTTP /metrics")
    p.add_argument("--server-name", action="append",
                   help=f"DNS name(s) in the CA's serving certificate (default {DEFAULT_SERVER_NAME})")
    p.set_defaults(func=_guard(cmd_serve))

    p = sub.add_parser("request", help="ask a CA for a workload certificate as a node (debugging, demos)")
    p.add_argument("identity", help="spiffe://<trust-domain>/ns/<ns>/sa/<sa>")
    p.add_argument("--ca-url", required=True, help="https://HOST:PORT")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--node-creds", type=Path, help="directory written by 'ca issue-node'")
    who.add_argument("--token-file", type=Path, help="a service-account token (CA run with --auth tokenreview)")
    p.add_argument("--ca-roots", type=Path, help="with --token-file: the CA's root certificate (PEM)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--ttl", type=float, help="requested lifetime in seconds (the CA may shorten it)")
    p.add_argument("--server-name", default=DEFAULT_SERVER_NAME)
    p.set_defaults(func=_guard(cmd_request))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m mesh.ca.cli``), the same commands as ``nodemesh ca``."""
    parser = argparse.ArgumentParser(prog="nodemesh")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
