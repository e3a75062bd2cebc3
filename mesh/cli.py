"""The `nodemesh` command.

Subcommand groups of other parts (the agent's `redirect`, `agent`, the waypoint, ...) are found through the
`nodemesh.commands` entry-point group, so this module never imports `agent` or `waypoint`: dependencies
keep pointing from them to `mesh`, not back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from importlib.resources import files
from typing import Any

from mesh.lab import Lab, LabError, TopologyError, down_all, list_labs, load_topology

USER_ERRORS: tuple[type[BaseException], ...] = (TopologyError, LabError, LookupError, PermissionError)


def _default_lab_name() -> str:
    return os.environ.get("NODEMESH_LAB", "default")


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PermissionError("this command needs root (it creates network namespaces)")


def _print_lab(lab: Lab) -> None:
    s = lab.state
    print(f"lab {s.name}: fabric {s.fabric_cidr} in netns {s.fabric_netns}")
    for n in s.nodes:
        print(f"  node {n.name:<12} fabric {n.fabric_ip:<15} pods {n.pod_cidr:<18} netns {n.netns}")
        for p in s.pods:
            if p.node == n.name:
                print(
                    f"    pod {p.namespace}/{p.name:<16} ip {p.ip:<15} sa {p.service_account:<12} netns {p.netns}"
                )
    for svc in s.services:
        ports = ",".join(f"{p['port']}->{p['targetPort']}" for p in svc.ports)
        print(f"  service {svc.namespace}/{svc.name:<12} vip {svc.vip:<15} ports {ports}")


def cmd_lab_up(args: argparse.Namespace) -> int:
    _require_root()
    source = args.file or str(files("mesh.lab") / "default.yaml")
    topo = load_topology(source)
    lab = Lab.up(topo, name=args.name)
    _print_lab(lab)
    if args.kube:
        from mesh.lab.kube import LabKube

        try:
            kube = LabKube.start(lab)
        except BaseException:
            lab.down()
            raise
        print(f"API server {kube.url} (in the lab), {kube.host_url} (from this host)")
        print(f"kubeconfig: {kube.kubeconfig}")
        print(f"  export KUBECONFIG={kube.kubeconfig}; kubectl get pods -A -o wide")
    return 0


def cmd_lab_add_pod(args: argparse.Namespace) -> int:
    _require_root()
    from mesh.lab.kube import LabKube

    labels = dict(_key_value(v, "--label") for v in args.label or [])
    annotations = dict(_key_value(v, "--annotation") for v in args.annotation or [])
    kube = LabKube.attach(Lab.attach(args.name))
    pod = kube.add_pod(args.pod, namespace=args.namespace, node=args.node, service_account=args.service_account,
                       labels=labels, annotations=annotations)
    print(f"pod {pod.namespace}/{pod.name} on {pod.node}: ip {pod.ip}, netns {pod.netns} (running)")
    return 0


def cmd_lab_delete_pod(args: argparse.Namespace) -> int:
    _require_root()
    from mesh.lab.kube import LabKube

    LabKube.attach(Lab.attach(args.name)).delete_pod(args.pod)
    print(f"pod {args.pod} deleted")
    return 0


def _key_value(value: str, flag: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise LabError(f"{flag} {value!r}: use KEY=VALUE")
    return key, val


def cmd_lab_status(args: argparse.Namespace) -> int:
    lab = Lab.attach(args.name)
    if args.json:
        print(json.dumps(lab.state.to_json(), indent=2))
    else:
        _print_lab(lab)
    return 0


def cmd_lab_list(args: argparse.Namespace) -> int:
    for name in list_labs():
        print(name)
    return 0


def cmd_lab_exec(args: argparse.Namespace) -> int:
    _require_root()
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise LabError("lab exec: give a command after the pod name, e.g. lab exec client -- ping -c1 10.244.2.2")
    lab = Lab.attach(args.name)
    return lab.exec(args.target, cmd).returncode


def cmd_lab_down(args: argparse.Namespace) -> int:
    _require_root()
    from mesh.lab.kube import forget, forget_all

    if args.all:
        forget_all()
        removed = down_all()
    else:
        forget(args.name)
        removed = Lab.attach(args.name).down()
    print(f"removed {len(removed)} network namespaces")
    return 0


def cmd_lab_demo(args: argparse.Namespace) -> int:
    _require_root()
    from mesh.lab.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodemesh", description="An ambient-style service mesh.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    lab = sub.add_parser("lab", help="a multi-node cluster of network namespaces on this machine")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    name_kw: dict[str, Any] = {"default": _default_lab_name(), "help": "lab name (env NODEMESH_LAB)"}

    p = lab_sub.add_parser("up", help="build a lab from a topology file (default: the embedded one)")
    p.add_argument("file", nargs="?", help="topology YAML (see docs/lab.md)")
    p.add_argument("--name", **name_kw)
    p.add_argument("--kube", action="store_true",
                   help="also run an API server test double for the lab and print its kubeconfig "
                        "(see docs/kubernetes.md)")
    p.set_defaults(func=cmd_lab_up)

    p = lab_sub.add_parser("add-pod", help="create a pod at run time as kubelet would (needs 'lab up --kube')")
    p.add_argument("--name", **name_kw)
    p.add_argument("pod", help="pod name")
    p.add_argument("--namespace", default="default")
    p.add_argument("--node", help="default: the first node")
    p.add_argument("--service-account", default="default")
    p.add_argument("--label", action="append", help="KEY=VALUE (repeatable)")
    p.add_argument("--annotation", action="append", help="KEY=VALUE (repeatable)")
    p.set_defaults(func=cmd_lab_add_pod)

    p = lab_sub.add_parser("delete-pod", help="delete a pod added at run time (CNI DEL, sandbox removed)")
    p.add_argument("--name", **name_kw)
    p.add_argument("pod")
    p.set_defaults(func=cmd_lab_delete_pod)

    p = lab_sub.add_parser("status", help="nodes, pods, IPs and netns names of a lab")
    p.add_argument("--name", **name_kw)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lab_status)

    p = lab_sub.add_parser("list", help="the labs that exist")
    p.set_defaults(func=cmd_lab_list)

    p = lab_sub.add_parser("exec", help="run a command in a pod's (or node's) network namespace")
    p.add_argument("--name", **name_kw)
    p.add_argument("target", help="pod or node name")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lab_exec)

    p = lab_sub.add_parser("down", help="remove a lab, or with --all every lab this tool created")
    p.add_argument("--name", **name_kw)
    p.add_argument("--all", action="store_true", help="every nm- namespace and lab state file")
    p.set_defaults(func=cmd_lab_down)

    p = lab_sub.add_parser("demo", help="the lab alone: bring it up, show pod-to-pod traffic, tear it down")
    p.set_defaults(func=cmd_lab_demo)

    for ep in sorted(entry_points(group="nodemesh.commands"), key=lambda e: e.name):
        try:
            register: Callable[[Any], None] = ep.load()
        except ImportError as e:
            # One broken part must not take the other commands (lab down, above all) with it.
            print(f"nodemesh: command group {ep.name!r} unavailable: {e}", file=sys.stderr)
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        rc = args.func(args)
    except USER_ERRORS as e:
        print(f"nodemesh: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
