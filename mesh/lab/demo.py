"""The embedded demo: a two-node lab, pod-to-pod traffic across nodes and on one node, then teardown.

It is the first of the README's two commands. It runs in a lab of its own name, so it can run while tests
use theirs, and it always tears down what it built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib.resources import files

from mesh.lab import Lab, load_topology
from mesh.lab.state import state_path

ECHO_PORT = 8080


def _wait_listening(lab: Lab, pod: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.exec(pod, ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{pod}: nothing listening on {port} after {timeout}s")


def run_demo(name: str = "demo") -> int:
    if state_path(name).exists():
        Lab.attach(name).down()
    topo = load_topology(str(files("mesh.lab") / "default.yaml"))
    started = time.monotonic()
    lab = Lab.up(topo, name=name)
    try:
        print(f"== lab {name!r} up in {time.monotonic() - started:.2f}s")
        for p in lab.state.pods:
            print(f"   {p.node}: pod {p.namespace}/{p.name} {p.ip} (sa {p.service_account})")
        py = sys.executable
        env = dict(os.environ)
        servers = [
            lab.popen(pod, [py, "-m", "mesh.lab.echo", "serve", str(ECHO_PORT)], stdout=subprocess.DEVNULL, env=env)
            for pod in ("server", "server-a")
        ]
        try:
            for pod in ("server", "server-a"):
                _wait_listening(lab, pod, ECHO_PORT)
            ok = True
            for target, where in (("server", "across nodes"), ("server-a", "on the same node")):
                ip = lab.pod(target).ip
                ping = lab.exec("client", ["ping", "-c1", "-W2", ip], capture_output=True, text=True)
                res = lab.exec(
                    "client", [py, "-m", "mesh.lab.echo", "send", ip, str(ECHO_PORT), "1048576"],
                    capture_output=True, text=True, env=env,
                )
                if res.returncode != 0:
                    print(f"   client -> {target} ({where}): FAILED {res.stderr.strip()[-300:]}")
                    ok = False
                    continue
                r = json.loads(res.stdout)
                ok &= bool(r["match"]) and ping.returncode == 0
                print(
                    f"== client {r['local']} -> {target} {ip}:{ECHO_PORT} ({where}): ping "
                    f"{'ok' if ping.returncode == 0 else 'FAILED'}, {r['bytes']} bytes echoed, "
                    f"{'byte-exact' if r['match'] else 'CORRUPTED'}, server saw {r['server_saw']}"
                )
        finally:
            for s in servers:
                s.kill()
                s.wait()
    finally:
        removed = lab.down()
        print(f"== lab {name!r} torn down ({len(removed)} network namespaces removed)")
    return 0 if ok else 1
