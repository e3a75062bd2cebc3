"""`nodemesh demo` (what `make demo` runs): the mesh end to end in a two-node lab, in under a minute.

It brings up the embedded lab, a CA and one agent per node; shows traffic across nodes and on one node
between unmodified pods, that the fabric between the nodes saw only TLS, the identities each side
proved, a policy denial, and a metrics excerpt; then tears everything down.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

from agent.labmesh import MeshLab
from mesh.lab import Lab, load_topology
from mesh.lab.state import state_path

PY = sys.executable
PORT = 8080


def _say(msg: str) -> None:
    print(msg, flush=True)


def _send(lab: Lab, src: str, ip: str, port: int = PORT, size: int = 65536) -> dict:
    res = lab.exec(src, [PY, "-m", "mesh.lab.echo", "send", ip, str(port), str(size)],
                   capture_output=True, text=True, timeout=60)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return json.loads(lines[0]) if lines else {"error": res.stderr.strip()[-200:]}


def _identities(log: str, src: str) -> tuple[str, str]:
    for line in reversed(log.splitlines()):
        if f'src.addr="{src}' in line and "src.identity=" in line:
            s = re.search(r'src\.identity="([^"]+)"', line)
            d = re.search(r'dst\.identity="([^"]+)"', line)
            return (s.group(1) if s else "?", d.group(1) if d else "?")
    return ("?", "?")


def run(name: str = "demo") -> int:
    started = time.monotonic()
    if state_path(name).exists():
        Lab.attach(name).down()
    lab = Lab.up(load_topology(str(files("mesh.lab") / "default.yaml")), name=name)
    policies = Path(tempfile.mkdtemp(prefix="nodemesh-demo-")) / "policies.yaml"
    policies.write_text("")
    mesh = MeshLab(lab, extra_agent_args=["--config", f"policies:{policies}"])
    apps: list[subprocess.Popen] = []
    ok = True
    try:
        _say(f"== lab {name!r}: 2 nodes, {len(lab.state.pods)} pods (namespace default is ambient)")
        for p in lab.state.pods:
            _say(f"   {p.node}: {p.namespace}/{p.name:<9} {p.ip:<12} serviceAccount {p.service_account}")
        for pod in ("server", "server-a"):
            apps.append(lab.popen(pod, [PY, "-m", "mesh.lab.echo", "serve", str(PORT)], stdout=subprocess.DEVNULL))
        mesh.start()
        _say(f"== CA at {mesh.ca_url}; agents ready on " + ", ".join(n.name for n in lab.state.nodes)
             + f" (redirection: {mesh.config_dump(lab.state.nodes[0].name)['redirection']})")

        client = lab.pod("client")
        dump = lab.popen("fabric", ["tcpdump", "-Z", "root", "-nn", "-A", "-l", "-i", "n0", "tcp"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace")
        time.sleep(0.8)
        for target, where in (("server", "across nodes"), ("server-a", "on the same node")):
            r = _send(lab, "client", lab.pod(target).ip, size=1 << 20)
            good = bool(r.get("match"))
            ok &= good
            _say(f"== client -> {target} {lab.pod(target).ip}:{PORT} ({where}): "
                 + (f"{r['bytes']} bytes echoed byte-exact; the app saw the client as {r['server_saw']}"
                    if good else f"FAILED {r}"))
        time.sleep(0.5)
        dump.terminate()
        capture, _ = dump.communicate(timeout=10)
        hbone = sum(1 for ln in capture.splitlines() if ".15008" in ln and " IP " in ln)
        clear = [ln for ln in capture.splitlines() if f".{PORT}:" in ln or f".{PORT} >" in ln]
        _say(f"== fabric capture on node-a's link: {hbone} packets, all to/from port 15008 (mTLS); "
             f"{len(clear)} packets on the app port in clear")
        ok &= hbone > 0 and not clear

        time.sleep(0.3)
        src_id, dst_id = _identities(mesh.log_text("agent-node-b"), client.ip)
        _say(f"== identities proved in the tunnel: client {src_id} -> server {dst_id}")

        policies.write_text(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: only-sleep, namespace: default}\n"
            "spec:\n  selector: {matchLabels: {app: server}}\n  action: ALLOW\n"
            "  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]\n")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(
                "default/only-sleep" in mesh.config_dump(n.name)["policies"] for n in lab.state.nodes):
            time.sleep(0.1)  # the agents re-read the file within half a second
        allowed = _send(lab, "client", lab.pod("server").ip)
        denied = _send(lab, "other", lab.pod("server").ip)
        ok &= bool(allowed.get("match")) and not denied.get("match")
        _say("== policy ALLOW only spiffe://cluster.local/ns/default/sa/sleep on app=server:")
        verdict = f"denied: {denied.get('error', '')}" if not denied.get("match") else "NOT DENIED"
        _say(f"   client (sa sleep) -> server: {'allowed' if allowed.get('match') else 'FAILED'}; "
             f"other (sa other) -> server: {verdict}")
        for line in mesh.log_text("agent-node-b").splitlines():
            if "policy rejection" in line:
                _say("   " + line.split(" access ", 1)[-1][:240])
                break

        time.sleep(0.3)
        _say("== metrics excerpt from node-b's agent (:15020/metrics):")
        for line in mesh.metrics("node-b").splitlines():
            if line.startswith(("istio_tcp_connections_opened_total{", "istio_tcp_received_bytes_total{")) \
                    and 'reporter="destination"' in line:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                value = line.rsplit(" ", 1)[1]
                _say(f"   {line.split('{')[0]}{{source_principal={labels['source_principal']}, "
                     f"destination_workload={labels['destination_workload']}, "
                     f"response_flags={labels['response_flags']}, "
                     f"connection_security_policy={labels['connection_security_policy']}}} {value}")
    except Exception as e:
        ok = False
        _say(f"== demo failed: {e}")
        for log in ("ca", "agent-node-a", "agent-node-b"):
            tail = mesh.log_tail(log, 10)
            if tail:
                _say(f"-- {log} log:\n{tail}")
    finally:
        for a in apps:
            a.kill()
            a.wait()
        mesh.stop()
        shutil.rmtree(policies.parent, ignore_errors=True)
        removed = lab.down()
        _say(f"== torn down: agents, CA and {len(removed)} network namespaces "
             f"({time.monotonic() - started:.1f}s in all); {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    import os

    if os.geteuid() != 0:
        print("nodemesh demo: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    return run(args.name)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="the mesh demo: a 2-node lab, CA and agents, traffic, policy, metrics")
    p.add_argument("--name", default="demo", help="lab name (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
