"""Kubernetes mode in the lab: how fast enrolment takes effect, and what closing the CNI window costs.

Real agents (`--config kube`), the real CA (token review, pod placement), the lab's API server double,
kubectl. Compared side by side in the same run, medians over several runs:

* ``label -> captured``: `kubectl label namespace ... ambient` until every running pod of the namespace
  on the node is captured (agent's config dump), with PODS pods; and the reverse (release);
* pod start, from the pod object's creation to the sandbox being ready for the app (`lab add-pod`):
  - ``mesh pod``: the CNI plugin waits until the agent has captured the pod (the window closed);
  - ``pod outside the mesh``: the plugin asks the agent, which answers "not enrolled";
  - ``excluded namespace``: the plugin passes the pod through without asking (the runtime's own cost,
    the floor).

Target (issue 7): running pods captured within 2 s of the label. Results: ``bench/results/kube.{md,json}``.
"""

from __future__ import annotations

import json
import secrets
import statistics
import time
from pathlib import Path

from agent.labmesh import MeshLab
from mesh.lab import Lab, load_topology
from mesh.lab.kube import LabKube

PODS = 10
RUNS = 5
DEADLINE_S = 240.0
RESULTS = Path(__file__).parent / "results"


def _captured(mesh: MeshLab) -> int:
    return len(mesh.config_dump("node-a")["pods"])


def _until(pred, timeout: float = 30.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if pred():
            return time.perf_counter() - start
        time.sleep(0.01)
    raise RuntimeError("condition not reached")


def main() -> int:
    started = time.monotonic()
    topo = {"nodes": [{"name": "node-a", "pods": [{"name": f"app{i}", "namespace": "default",
                                                   "serviceAccount": f"sa{i}", "labels": {"app": f"app{i}"}}
                                                  for i in range(PODS)]},
                      {"name": "node-b", "pods": []}]}
    lab = Lab.up(load_topology(topo), name="b" + secrets.token_hex(4))
    kube = mesh = None
    rows: dict[str, list[float]] = {k: [] for k in ("label -> captured", "unlabel -> released", "mesh pod",
                                                     "pod outside the mesh", "excluded namespace")}
    try:
        kube = LabKube.start(lab)
        mesh = MeshLab(lab, kube=kube).start()
        kube.kubectl("get", "namespaces")  # warm kubectl's discovery cache
        ns = mesh.workdir / "ns.json"
        ns.write_text(json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "plain"}}))
        kube.kubectl("apply", "-f", str(ns))
        for run in range(RUNS):
            if time.monotonic() - started > DEADLINE_S:
                break
            t = time.perf_counter()
            kube.kubectl("label", "namespace", "default", "istio.io/dataplane-mode=ambient", "--overwrite")
            rows["label -> captured"].append(time.perf_counter() - t + _until(lambda: _captured(mesh) == PODS))
            for key, namespace in (("mesh pod", "default"), ("pod outside the mesh", "plain"),
                                   ("excluded namespace", "kube-system")):
                name = f"{key.split()[0][:4]}{run}"
                t = time.perf_counter()
                kube.add_pod(name, namespace=namespace, node="node-a")
                rows[key].append(time.perf_counter() - t)
                kube.delete_pod(name)
            _until(lambda: _captured(mesh) == PODS)
            t = time.perf_counter()
            kube.kubectl("label", "namespace", "default", "istio.io/dataplane-mode-")
            rows["unlabel -> released"].append(time.perf_counter() - t + _until(lambda: _captured(mesh) == 0))
    finally:
        if mesh is not None:
            mesh.stop()
        if kube is not None:
            kube.stop()
        lab.down()
    RESULTS.mkdir(exist_ok=True)
    table = ["| path | median | min | max | runs |", "| --- | --- | --- | --- | --- |"]
    for key, values in rows.items():
        if values:
            table.append(f"| {key} | {statistics.median(values):.3f} s | {min(values):.3f} s | {max(values):.3f} s "
                         f"| {len(values)} |")
    text = f"Kubernetes mode, {PODS} pods on the node, medians of {RUNS} runs\n\n" + "\n".join(table) + "\n"
    print(text)
    (RESULTS / "kube.md").write_text(text)
    (RESULTS / "kube.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
