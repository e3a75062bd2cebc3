"""`nodemesh waypoint`: run a waypoint proxy (in the lab, or in a waypoint pod).

    nodemesh waypoint --name NS/NAME --config-dir DIR --mesh-config FILE|lab:NAME (--cert-dir DIR | --ca DIR)

The mesh model (Services, pods, their identities and `istio.io/use-waypoint` bindings) comes from a
ztunnel-format local config file or a netns lab's state; the L7 config from a directory of HTTPRoute /
GRPCRoute / VirtualService / DestinationRule / AuthorizationPolicy YAML, or from the Kubernetes API
(`--kube`). The certificate comes from files (`cert-chain.pem`, `key.pem`, `root-cert.pem`) or, in the
lab, is issued at start from a local CA directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

log = logging.getLogger("waypoint.cli")


class CliError(Exception):
    pass


def _hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise CliError(f"{what}: expected HOST:PORT, got {value!r}")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def _name(value: str) -> tuple[str, str]:
    ns, sep, name = value.partition("/")
    if not sep or not ns or not name:
        raise CliError(f"--name: expected NAMESPACE/NAME (the waypoint Gateway), got {value!r}")
    return ns, name


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("waypoint", help="run a waypoint (the L7 proxy of the mesh)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="NAMESPACE/NAME of the waypoint Gateway")
    p.add_argument("--service-account", help="the waypoint's service account (default: its name)")
    p.add_argument("--config-dir", action="append", default=[], help="directory of L7 config YAML (repeatable)")
    p.add_argument("--kube", action="store_true", help="watch the L7 config in the Kubernetes API")
    p.add_argument("--kubeconfig", help="kubeconfig for --kube (default: in-cluster, then ~/.kube/config)")
    p.add_argument("--mesh-config", required=True,
                   help="local config file, lab:NAME for a netns lab, or kube (Pods/Services from the API)")
    creds = p.add_mutually_exclusive_group(required=True)
    creds.add_argument("--cert-dir", help="cert-chain.pem, key.pem (0600) and root-cert.pem")
    creds.add_argument("--ca", help="a local CA directory to issue the waypoint's certificate from (lab use)")
    creds.add_argument("--ca-url", help="https://HOST:PORT of the mesh CA: obtain and renew the certificate there "
                                        "with the waypoint's own service-account token (the CA needs "
                                        "--workload-tokens)")
    p.add_argument("--ca-token", help="with --ca-url: the projected service-account token file (audience nodemesh-ca)")
    p.add_argument("--ca-roots", help="with --ca-url: the CA's root certificate (PEM)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--listen", default="0.0.0.0:15008", help="HBONE listener (default 0.0.0.0:15008)")
    p.add_argument("--hbone-port", type=int, default=15008, help="the destination agents' HBONE port")
    p.add_argument("--admin", default="0.0.0.0:15020", help="metrics/readiness HOST:PORT ('off' to disable)")
    p.add_argument("--access-log", choices=("text", "json", "off"), default="text")
    p.add_argument("--tracing-sampling", type=float, default=1.0, help="percent of new traces sampled (1)")
    p.add_argument("--otlp-endpoint", help="export sampled spans over OTLP/HTTP, e.g. http://collector:4318")
    p.add_argument("--filter", action="append", default=[], help="package.module:Class (repeatable, in order)")
    p.set_defaults(func=cmd_waypoint)

    c = subparsers.add_parser("waypoint-controller",
                              help="turn istio-waypoint Gateways into waypoint Deployments and Services")
    c.add_argument("--kubeconfig", help="default: in-cluster, then $KUBECONFIG or ~/.kube/config")
    c.add_argument("--image", default=None, help="the waypoint image (default: the project's release image)")
    c.add_argument("--trust-domain", default="cluster.local")
    c.add_argument("--ca-url", default=None, help="the CA waypoints obtain their certificate from "
                                                  "(default https://nodemesh-ca.nodemesh-system.svc:15012)")
    c.add_argument("--ca-roots", required=True, help="the CA's root certificate (PEM), passed on to every waypoint")
    c.set_defaults(func=cmd_controller)


def cmd_controller(args: argparse.Namespace) -> int:
    from waypoint.controller import DEFAULT_CA_URL, DEFAULT_IMAGE, Settings, run_controller

    try:
        roots = Path(args.ca_roots).read_text()
    except OSError as exc:
        print(f"nodemesh waypoint-controller: --ca-roots {args.ca_roots}: {exc.strerror}")
        return 2
    settings = Settings(image=args.image or DEFAULT_IMAGE, trust_domain=args.trust_domain,
                        ca_url=args.ca_url or DEFAULT_CA_URL, ca_roots_pem=roots)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_controller(args.kubeconfig, settings))
    return 0


def cmd_waypoint(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except CliError as exc:
        log.error("%s", exc)
        print(f"nodemesh waypoint: {exc}")
        return 2


def _mesh_source(spec: str, store: Any) -> Any:
    from mesh.config import lab_state_source, local_config_source

    if spec.startswith("lab:"):
        from mesh.lab.state import state_path

        path = state_path(spec[4:])
        if not path.exists():
            raise CliError(f"--mesh-config {spec}: lab {spec[4:]!r} has no state file (is it up?)")
        return lab_state_source(path, store)
    if not Path(spec).exists():
        raise CliError(f"--mesh-config {spec}: file not found")
    return local_config_source(spec, store)


def _certificate(args: argparse.Namespace, identity: Any) -> Any:
    from mesh.ca import CertificateAuthority
    from mesh.identity import IdentityError, WorkloadCert

    try:
        if args.cert_dir:
            cert = WorkloadCert.read_files(args.cert_dir)
            if str(cert.identity) != str(identity):
                raise CliError(f"--cert-dir {args.cert_dir}: the certificate is for {cert.identity}, "
                               f"not the waypoint's {identity}")
            return cert
        return CertificateAuthority.load(args.ca).issue_workload(identity)
    except IdentityError as exc:
        raise CliError(f"certificate: {exc}") from exc
    except OSError as exc:
        raise CliError(f"certificate: {exc}") from exc


async def _certificate_from_ca(args: argparse.Namespace, identity: Any) -> tuple[Any, Any]:
    """A certificate manager fed by the CA with the waypoint's own token: renewed at half life, and the
    previous certificate served while a renewal is pending (a callable, read at each handshake)."""
    from mesh.ca.client import CAClient, CAClientError
    from mesh.ca.kube import TokenCredentials
    from mesh.certmanager import CertificateManager, CertUnavailable
    from mesh.identity import IdentityError, SpiffeId, TrustBundle

    if not (args.ca_token and args.ca_roots):
        raise CliError("--ca-url needs --ca-token and --ca-roots")
    try:
        if args.ca_roots.startswith("env:"):  # the controller hands the root certificate over in the pod spec
            pem = os.environ.get(args.ca_roots[4:], "")
            if not pem.strip():
                raise CliError(f"--ca-roots {args.ca_roots}: the environment variable is empty")
            creds = TokenCredentials(Path(args.ca_token), TrustBundle.from_pem(pem.encode()))
        else:
            creds = TokenCredentials.read(args.ca_token, args.ca_roots)
        client = CAClient(args.ca_url, creds)
    except (IdentityError, ValueError) as exc:
        raise CliError(f"--ca-url: {exc}") from exc
    sid = SpiffeId.parse(str(identity))
    manager = CertificateManager(client.fetch)
    try:
        first = await manager.get(sid, timeout=60)
    except (CertUnavailable, CAClientError) as exc:
        await manager.aclose()
        raise CliError(f"certificate from {args.ca_url}: {exc}") from exc
    latest = [first]

    def current() -> Any:
        cert = manager.current(sid)
        if cert is not None:
            latest[0] = cert
        return latest[0]

    return manager, current


async def _run(args: argparse.Namespace) -> int:
    from mesh.config import ConfigStore as MeshStore
    from waypoint.app import WaypointApp, WaypointSettings
    from waypoint.configsource import ConfigDirSource
    from waypoint.filters import FilterLoadError, load_filter

    ns, name = _name(args.name)
    admin = None if args.admin == "off" else _hostport(args.admin, "--admin")
    try:
        settings = WaypointSettings(namespace=ns, name=name, service_account=args.service_account,
                                    trust_domain=args.trust_domain, listen=_hostport(args.listen, "--listen"),
                                    hbone_port=args.hbone_port, admin=admin, access_log=args.access_log,
                                    sampling=args.tracing_sampling, otlp_endpoint=args.otlp_endpoint)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    try:
        filters = [load_filter(spec) for spec in args.filter]
    except FilterLoadError as exc:
        raise CliError(str(exc)) from exc
    for d in args.config_dir:
        if not Path(d).is_dir():
            raise CliError(f"--config-dir {d}: not a directory")
    if not args.config_dir and not args.kube:
        raise CliError("give --config-dir DIR and/or --kube: the waypoint needs a source of L7 config")
    mesh = MeshStore()
    kube_mesh = None
    if args.mesh_config == "kube":
        from waypoint.kube import Kube, load_configuration
        from waypoint.kubewatch import KubeMeshSource

        kube_mesh = KubeMeshSource(mesh, Kube(await load_configuration(args.kubeconfig)), args.trust_domain)
        source = None
    else:
        source = _mesh_source(args.mesh_config, mesh)
        source.poll()
        if source.last_error:
            log.error("mesh config: %s", source.last_error)
    manager = None
    if args.ca_url:
        manager, cert = await _certificate_from_ca(args, settings.identity)
    else:
        cert = _certificate(args, settings.identity)
    app = WaypointApp(settings, cert=cert, mesh=mesh, filters=filters)
    config_dir = ConfigDirSource(app.config, args.config_dir) if args.config_dir else None
    watch = None
    if config_dir is not None:
        config_dir.start()
    if source is not None:
        source.start()
    if kube_mesh is not None:
        await kube_mesh.start()
    if args.kube:
        from waypoint.kubewatch import KubeConfigWatch

        watch = KubeConfigWatch(app.config, kubeconfig=args.kubeconfig)
        await watch.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await app.start()
    print(f"waypoint {ns}/{name} ready on {app.address[0]}:{app.address[1]}", flush=True)  # type: ignore[index]
    try:
        await stop.wait()
    finally:
        if watch is not None:
            await watch.stop()
        if config_dir is not None:
            await config_dir.stop()
        if source is not None:
            await source.stop()
        if kube_mesh is not None:
            await kube_mesh.stop()
            await kube_mesh.kube.close()
        await app.close(drain_timeout=5.0)
        if manager is not None:
            await manager.aclose()
    return 0
