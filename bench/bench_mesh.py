"""The mesh end to end in a netns lab, side by side with no mesh and with a stunnel4 pair, in one run.

One lab, two nodes, the client on node-a and the server on node-b. The pods of namespace ``mesh`` are
enrolled (``istio.io/dataplane-mode=ambient``), those of ``plain`` are not; both pairs take the same path
through their nodes and the fabric. Modes:

* ``direct``:  client-plain -> server-plain, no proxy at all;
* ``mesh``:    client -> (captured) node-a agent -> HBONE mTLS -> node-b agent -> server: real agents;
* ``stunnel``: client-plain -> stunnel4 client in that pod -> TLS 1.3, mutual certificates from
  ``mesh.ca`` -> stunnel4 server in server-plain -> server: a C TLS tunnel as the peer.

(a) bulk: one TCP connection, ``MESH_BENCH_MIB`` MiB one way, MB/s. (b) 1 KiB request/response at a fixed
rate (1000/s) over 4 connections, open loop (``bench/loadgen.py``), latency percentiles from each
request's due time; "added" = the mode's percentile minus direct's in the same round. Every round runs
every mode (order rotated per round, so drift hits all alike); figures are medians over rounds.
(c) agent cost: CPU seconds per 1000 requests from /proc (utime+stime around the fixed-rate runs), and
resident memory, in this lab (one enrolled pod per node) and in a second lab with 100 enrolled pods on
node-a. Goals are reported next to the figures, never asserted: a benchmark reports.

Run as root: ``python -m bench mesh`` (or ``python -m bench.bench_mesh [--profile]``). Results:
``bench/results/mesh.{md,json,png}``; with ``--profile`` (or ``MESH_BENCH_PROFILE=1``) an extra mesh run
of each load is sampled with py-spy (and perf, where installed) and summarized in
``bench/results/mesh-profile.txt``. The method and the latest figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import meshreport
from bench.procstat import (
    Sample,
    collapsed_top,
    cpu_seconds,
    largest_mappings,
    memory,
    perf_dso_split,
    sample,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
MODES = ("direct", "mesh", "stunnel")
SINK, ECHO = 9000, 9001  # the app's ports in the server pods
ST_SINK, ST_ECHO = 9443, 9444  # stunnel server in server-plain
ST_LOCAL_SINK, ST_LOCAL_ECHO = 19000, 19001  # stunnel client on client-plain's loopback
GOALS = {"bulk_ratio_min": 0.5, "added_p90_ms_max": 0.5, "cpu_s_per_1000_max": 0.15, "rss_mib_max": 60.0}


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    runs: int = 6
    bulk_mib: int = 512
    rate: float = 1000.0
    conns: int = 4
    seconds: float = 4.0
    pods: int = 100
    runs_100: int = 3
    profile: bool = False
    deadline_s: float = 600.0

    @classmethod
    def from_env(cls, profile: bool = False) -> Settings:
        return cls(runs=_env_number("MESH_BENCH_RUNS", 6, int), bulk_mib=_env_number("MESH_BENCH_MIB", 512, int),
                   seconds=_env_number("MESH_BENCH_SECONDS", 4.0, float),
                   pods=_env_number("MESH_BENCH_PODS", 100, int),
                   profile=profile or os.environ.get("MESH_BENCH_PROFILE", "") == "1")


def _env_number(name: str, default: float, kind: type) -> Any:
    text = os.environ.get(name)
    if text is None or text == "":
        return kind(default)
    try:
        value = kind(text)
    except ValueError:
        raise BenchError(f"{name}={text!r}: not a {'whole ' if kind is int else ''}number") from None
    if value <= 0:
        raise BenchError(f"{name}={text!r}: must be above 0")
    return value


def topology(fillers: int = 0, plain: bool = True) -> dict[str, Any]:
    """node-a: the clients (and ``fillers`` idle enrolled pods); node-b: the servers."""
    a = [{"name": "client", "namespace": "mesh", "serviceAccount": "client", "labels": {"app": "client"}}]
    b = [{"name": "server", "namespace": "mesh", "serviceAccount": "server", "labels": {"app": "server"}}]
    # Ten pods per service account, as replicas of ten deployments would be.
    a += [{"name": f"idle{i:03d}", "namespace": "mesh", "serviceAccount": f"idle{i % 10}",
           "labels": {"app": f"idle{i % 10}"}} for i in range(fillers)]
    if plain:
        a.append({"name": "client-plain", "namespace": "plain", "labels": {"app": "client"}})
        b.append({"name": "server-plain", "namespace": "plain", "labels": {"app": "server"}})
    return {"namespaces": {"mesh": {"labels": {"istio.io/dataplane-mode": "ambient"}}, "plain": {"labels": {}}},
            "nodes": [{"name": "node-a", "pods": a}, {"name": "node-b", "pods": b}]}


@dataclass(frozen=True)
class Target:
    """Where a mode's client runs and what it connects to."""

    pod: str
    host: str
    sink: int
    echo: int


# ---- child processes --------------------------------------------------------------------------------


class Child:
    """A process in a lab namespace whose stdout lines arrive on a queue (so reads can time out)."""

    def __init__(self, lab: Any, target: str, argv: list[str], stderr: Any = subprocess.PIPE) -> None:
        self.argv = argv
        self.proc: subprocess.Popen[str] = lab.popen(target, argv, cwd=ROOT, stdout=subprocess.PIPE,
                                                     stderr=stderr, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump_out, daemon=True).start()
        if stderr is subprocess.PIPE:
            threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            del self.err[:-50]

    def readline(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{' '.join(self.argv[-6:])}: no output within {timeout:.0f}s") from None
        if line is None:
            self.proc.wait(5)
            raise BenchError(f"{' '.join(self.argv[-6:])} exited {self.proc.returncode}: "
                             f"{''.join(self.err)[-800:]}")
        return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def loadgen(*args: object) -> list[str]:
    return [PY, "-m", "bench.loadgen", *(str(a) for a in args)]


def measured(lab: Any, pod: str, args: list[str], pids: dict[str, int], timeout: float
             ) -> tuple[dict[str, Any], dict[str, Sample]]:
    """Run a load client; ``pids`` are sampled when it says START and when its result arrives."""
    child = Child(lab, pod, loadgen(*args))
    try:
        line = child.readline(timeout)
        if line != "START":
            raise BenchError(f"{pod}: loadgen {args[0]}: {line}")
        before = {name: sample(pid) for name, pid in pids.items()}
        line = child.readline(timeout)
        after = {name: sample(pid) for name, pid in pids.items()}
        out = json.loads(line)
        if "error" in out:
            raise BenchError(f"{pod}: loadgen {args[0]}: {out['error']}")
        return out, {name: after[name] - before[name] for name in pids}
    finally:
        child.stop()


def costs(delta: dict[str, Sample]) -> dict[str, dict[str, float]]:
    """Per process: CPU seconds, and seconds spent waiting for a CPU."""
    return {"cpu_s": {n: d.cpu for n, d in delta.items()}, "runq_s": {n: d.runq_wait for n, d in delta.items()}}


def wait_listening(lab: Any, target: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = lab.exec(target, ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True)
        if res.stdout.strip():
            return
        time.sleep(0.1)
    raise BenchError(f"nothing listens on port {port} in {target} after {timeout:.0f}s")


def start_server(lab: Any, pod: str) -> Child:
    child = Child(lab, pod, loadgen("serve", SINK, ECHO))
    if child.readline(30) != "READY":
        raise BenchError(f"{pod}: the load server did not start")
    return child


def start_stunnel(lab: Any, workdir: Path, server_ip: str) -> list[Child]:
    """A stunnel4 pair with mutual TLS 1.3 (the mesh's cipher suites), certificates from the mesh's CA."""
    from mesh.ca import CertificateAuthority
    from mesh.identity import SpiffeId

    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if binary is None:
        raise BenchError("stunnel4 is not installed (scripts/bootstrap.sh installs it)")
    ca = CertificateAuthority.create("cluster.local")
    files = {}
    for side in ("client", "server"):
        spiffe = SpiffeId.parse(f"spiffe://cluster.local/ns/plain/sa/{side}")
        files[side] = ca.issue_workload(spiffe).write_files(workdir / side)
    common = ("foreground = yes\npid =\ndebug = 3\nsslVersionMin = TLSv1.3\n"
              "ciphersuites = TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256\n"
              "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\nverifyChain = yes\n")
    confs = {}
    for side, routes in (("server", [(f"{server_ip}:{ST_SINK}", f"127.0.0.1:{SINK}"),
                                     (f"{server_ip}:{ST_ECHO}", f"127.0.0.1:{ECHO}")]),
                         ("client", [(f"127.0.0.1:{ST_LOCAL_SINK}", f"{server_ip}:{ST_SINK}"),
                                     (f"127.0.0.1:{ST_LOCAL_ECHO}", f"{server_ip}:{ST_ECHO}")])):
        chain, key, roots = files[side]
        text = common + f"cert = {chain}\nkey = {key}\nCAfile = {roots}\n"
        text += "client = yes\n" if side == "client" else ""
        for name, (accept, connect) in zip(("sink", "echo"), routes, strict=True):
            text += f"[{name}]\naccept = {accept}\nconnect = {connect}\n"
        confs[side] = workdir / f"stunnel-{side}.conf"
        confs[side].write_text(text)
    procs = [Child(lab, "server-plain", [binary, str(confs["server"])]),
             Child(lab, "client-plain", [binary, str(confs["client"])])]
    wait_listening(lab, "server-plain", ST_SINK)
    wait_listening(lab, "client-plain", ST_LOCAL_SINK)
    return procs


# ---- measurements ---------------------------------------------------------------------------------------


def percentiles(latencies_us: list[int]) -> dict[str, float]:
    n = len(latencies_us)
    if not n:
        return {}
    at = lambda q: latencies_us[min(n - 1, int(q * n))] / 1000.0  # noqa: E731 - ms
    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": latencies_us[-1] / 1000.0}


def destination_bytes(metrics_text: str) -> float:
    """Bytes the destination agent received from its tunnels, from its Istio TCP metrics."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("istio_tcp_received_bytes_total{") and 'reporter="destination"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Run:
    """Everything measured in the main lab, by mode, one entry per round."""

    bulk: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {m: [] for m in MODES})
    rate: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {m: [] for m in MODES})
    notes: list[str] = field(default_factory=list)


def bench_main_lab(s: Settings, started: float) -> dict[str, Any]:
    from agent.labmesh import MeshLab
    from mesh.lab import Lab, load_topology

    lab = Lab.up(load_topology(topology()), name="bm" + secrets.token_hex(4))
    workdir = Path(tempfile.mkdtemp(prefix="nodemesh-bench-mesh-"))
    os.chmod(workdir, 0o700)
    mesh = MeshLab(lab)
    children: list[Child] = []
    run = Run()
    try:
        children += [start_server(lab, "server"), start_server(lab, "server-plain")]
        server_ip, plain_ip = lab.pod("server").ip, lab.pod("server-plain").ip
        children += start_stunnel(lab, workdir, plain_ip)
        stunnel_pids = {"stunnel-client": children[-1].proc.pid, "stunnel-server": children[-2].proc.pid}
        t0 = time.monotonic()
        mesh.start(timeout=120)
        mesh_start_s = time.monotonic() - t0
        agents = {f"agent-{n}": p.pid for n, p in mesh.agents.items()}
        backend = mesh.config_dump("node-a").get("redirection")
        targets = {"direct": Target("client-plain", plain_ip, SINK, ECHO),
                   "mesh": Target("client", server_ip, SINK, ECHO),
                   "stunnel": Target("client-plain", "127.0.0.1", ST_LOCAL_SINK, ST_LOCAL_ECHO)}
        pids = {"direct": {}, "mesh": agents, "stunnel": stunnel_pids}
        idle = idle_cpu(agents, 3.0)
        memory_1pod = {name: memory(pid).as_dict() for name, pid in agents.items()}

        for t in targets.values():  # warm-up: first tunnel, certificates, stunnel sessions
            measured(lab, t.pod, ["bulk", t.host, t.sink, 16], {}, 60)
        dst_before = destination_bytes(mesh.metrics("node-b"))
        rate_args = ["--rate", s.rate, "--conns", s.conns, "--seconds", s.seconds]
        for r in range(s.runs):
            if time.monotonic() - started > s.deadline_s * 0.6:
                run.notes.append(f"bulk and rate stopped after {r} rounds: time budget")
                break
            order = MODES[r % 3:] + MODES[:r % 3]
            for mode in order:
                t = targets[mode]
                out, delta = measured(lab, t.pod, ["bulk", t.host, t.sink, s.bulk_mib], pids[mode], 120)
                run.bulk[mode].append({"mbps": out["mbps"], **costs(delta)})
            for mode in order:
                t = targets[mode]
                out, delta = measured(lab, t.pod, ["rate", t.host, t.echo, *rate_args], pids[mode], s.seconds + 60)
                lat = out.pop("latencies_us")
                run.rate[mode].append({**out, **percentiles(lat), **costs(delta)})
        carried = destination_bytes(mesh.metrics("node-b")) - dst_before
        expected = len(run.bulk["mesh"]) * s.bulk_mib * (1 << 20)
        if carried < expected:
            raise BenchError(f"the destination agent counted {carried:.0f} bytes, the mesh runs sent {expected}: "
                             "the mesh mode did not go through the agents")
        memory_after = {name: memory(pid).as_dict() for name, pid in agents.items()}
        profile = run_profile(lab, s, targets["mesh"], agents, workdir) if s.profile else None
        return {"run": run, "mesh_start_s": mesh_start_s, "redirection": backend, "idle_cpu_s_per_s": idle,
                "memory_1pod_ready": memory_1pod, "memory_1pod_after": memory_after,
                "mesh_bytes_counted": carried, "profile": profile}
    finally:
        for c in reversed(children):
            c.stop()
        mesh.stop()
        lab.down()
        shutil.rmtree(workdir, ignore_errors=True)


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU seconds per second the agents spend with no traffic (config polling, timers)."""
    before = {n: cpu_seconds(p) for n, p in pids.items()}
    time.sleep(seconds)
    return {n: (cpu_seconds(p) - before[n]) / seconds for n, p in pids.items()}


def bench_hundred_pods(s: Settings) -> dict[str, Any]:
    """(c): RSS and CPU of node-a's agent with ``s.pods`` enrolled pods on its node."""
    from agent.labmesh import MeshLab
    from mesh.lab import Lab, load_topology

    t0 = time.monotonic()
    lab = Lab.up(load_topology(topology(fillers=s.pods - 1, plain=False)), name="bm" + secrets.token_hex(4))
    lab_up_s = time.monotonic() - t0
    mesh = MeshLab(lab)
    children: list[Child] = []
    try:
        children.append(start_server(lab, "server"))
        t0 = time.monotonic()
        mesh.start(timeout=300)
        ready_s = time.monotonic() - t0
        dump = mesh.config_dump("node-a")
        captured = len(dump.get("pods", {}))
        agents = {f"agent-{n}": p.pid for n, p in mesh.agents.items()}
        pid_a = agents["agent-node-a"]
        time.sleep(2.0)  # certificates fetched for every identity, first timers fired
        mem_ready = memory(pid_a).as_dict()
        idle = idle_cpu(agents, 3.0)
        server_ip = lab.pod("server").ip
        measured(lab, "client", ["bulk", server_ip, SINK, 8], {}, 60)
        rates = []
        for _ in range(s.runs_100):
            out, delta = measured(lab, "client", ["rate", server_ip, ECHO, "--rate", s.rate, "--conns", s.conns,
                                                  "--seconds", s.seconds], agents, s.seconds + 60)
            lat = out.pop("latencies_us")
            rates.append({**out, **percentiles(lat), **costs(delta)})
        mem_after = memory(pid_a).as_dict()
        return {"pods_on_node": s.pods, "captured": captured, "lab_up_s": lab_up_s, "mesh_ready_s": ready_s,
                "memory_ready": mem_ready, "memory_after": mem_after, "idle_cpu_s_per_s": idle, "rate": rates,
                "threads": _threads(pid_a), "largest_mappings": largest_mappings(pid_a)}
    finally:
        for c in children:
            c.stop()
        mesh.stop()
        lab.down()


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# ---- profiling ----------------------------------------------------------------------------------------


def run_profile(lab: Any, s: Settings, t: Target, agents: dict[str, int], workdir: Path) -> dict[str, Any]:
    """Sample both agents during one extra mesh run of each load (not one of the measured runs).

    py-spy gives the Python functions; perf, where installed, the split between the kernel, OpenSSL's
    crypto, the interpreter and libc, which py-spy cannot see.
    """
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    perf = shutil.which("perf")
    out: dict[str, Any] = {}
    seconds = max(3, int(s.seconds))
    for load in ("rate", "bulk"):
        samplers: list[tuple[str, str, Path, subprocess.Popen[bytes]]] = []
        for name, pid in agents.items():
            if Path(spy).exists():
                raw = RESULTS / f"mesh-profile-{load}-{name}.txt"
                samplers.append(("py-spy", name, raw, subprocess.Popen(
                    [spy, "record", "--format", "raw", "--rate", "200", "--duration", str(seconds), "--pid",
                     str(pid), "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
            if perf:
                data = workdir / f"perf-{load}-{name}.data"
                samplers.append(("perf", name, data, subprocess.Popen(
                    [perf, "record", "-F", "499", "-p", str(pid), "-o", str(data), "--", "sleep", str(seconds)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        time.sleep(0.5)
        try:
            if load == "rate":
                measured(lab, t.pod, ["rate", t.host, t.echo, "--rate", s.rate, "--conns", s.conns, "--seconds",
                                      seconds], {}, seconds + 60)
            else:
                end = time.monotonic() + seconds
                for _ in range(50):
                    if time.monotonic() > end:
                        break
                    measured(lab, t.pod, ["bulk", t.host, t.sink, 128], {}, 60)
        finally:
            for tool, name, path, proc in samplers:
                try:
                    _, err = proc.communicate(timeout=seconds + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate()
                key = f"{load}/{name}"
                if not path.exists():
                    out.setdefault(key, {})[tool] = {"error": err.decode(errors="replace")[-400:]}
                elif tool == "py-spy":
                    out.setdefault(key, {})[tool] = collapsed_top(path)
                else:
                    out.setdefault(key, {})[tool] = perf_dso_split(path)
    if not out:
        out["error"] = "neither py-spy (pip install py-spy) nor perf was found"
    return out


# ---- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_mesh")
    ap.add_argument("--profile", action="store_true", help="also sample the agents with py-spy")
    a = ap.parse_args(argv if argv is not None else [])
    if os.geteuid() != 0:
        print("bench_mesh: needs root (network namespaces, eBPF)", file=sys.stderr)
        return 2
    try:
        s = Settings.from_env(profile=a.profile)
    except BenchError as e:
        print(f"bench_mesh: {e}", file=sys.stderr)
        return 2
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        main_lab = bench_main_lab(s, started)
        hundred = bench_hundred_pods(s)
    except (BenchError, OSError, subprocess.SubprocessError) as e:
        print(f"bench_mesh: {e}", file=sys.stderr)
        return 1
    env = {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
           "load_before": load_before, "load_after": os.getloadavg()[0],
           "elapsed_s": time.monotonic() - started, "settings": s.__dict__}
    summary = meshreport.summarize(main_lab, hundred, GOALS, env)
    table = meshreport.markdown(summary)
    print(table)
    (RESULTS / "mesh.md").write_text(table + "\n")
    (RESULTS / "mesh.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    meshreport.plot(summary, RESULTS / "mesh.png")
    if main_lab.get("profile"):
        (RESULTS / "mesh-profile.txt").write_text(meshreport.profile_text(main_lab["profile"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
