"""Turns the mesh benchmark's raw measurements into its summary (JSON), its table (Markdown) and its plot.

Kept apart from the measuring so the arithmetic (medians, paired differences, goal margins) can be read,
and checked, without a lab.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

MIB = 1 << 20
PERCENTILES = ("p50", "p90", "p99")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _agents(cpu: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in cpu.items() if k.startswith("agent-")}


def summarize_bulk(bulk: dict[str, list[dict[str, Any]]], mib: int) -> dict[str, Any]:
    gb = mib * MIB / 1e9
    out: dict[str, Any] = {}
    for mode, runs in bulk.items():
        entry: dict[str, Any] = {"runs_mbps": [round(r["mbps"], 1) for r in runs],
                                 "median_mbps": _median([r["mbps"] for r in runs])}
        if runs and runs[0]["cpu_s"]:
            names = sorted(runs[0]["cpu_s"])
            entry["cpu_s_per_gb"] = {n: _median([r["cpu_s"][n] / gb for r in runs]) for n in names}
            entry["cpu_s_per_gb"]["total"] = _median([sum(r["cpu_s"].values()) / gb for r in runs])
        out[mode] = entry
    direct = out.get("direct", {}).get("median_mbps", float("nan"))
    for mode in out:
        out[mode]["vs_direct"] = out[mode]["median_mbps"] / direct if direct else float("nan")
    return out


def summarize_rate(rate: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    direct = rate.get("direct", [])
    for mode, runs in rate.items():
        entry: dict[str, Any] = {q: _median([r[q] for r in runs]) for q in (*PERCENTILES, "max")}
        entry["runs"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                          if k not in ("cpu_s", "runq_s")} for r in runs]
        entry["lost"] = sum(r["lost"] for r in runs)
        entry["achieved_rate"] = _median([r["achieved_rate"] for r in runs])
        entry["max_send_lag_ms"] = max((r["max_send_lag_us"] for r in runs), default=0) / 1000
        if mode != "direct" and direct:
            # Paired by round: both ran back to back, so slow phases of the machine cancel out.
            entry["added"] = {q: _median([r[q] - d[q] for r, d in zip(runs, direct, strict=False)])
                              for q in PERCENTILES}
        if runs and _agents(runs[0]["cpu_s"]):
            entry["cpu_s_per_1000"] = cpu_per_1000(runs)
            entry["agents"] = agent_detail(runs)
        out[mode] = entry
    return out


def cpu_per_1000(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median over runs of each agent's CPU seconds per 1000 completed requests, and of both together."""
    runs = [r for r in runs if r["completed"]]
    if not runs:
        return {}
    names = sorted(_agents(runs[0]["cpu_s"]))
    per = {n: _median([r["cpu_s"][n] / (r["completed"] / 1000) for r in runs]) for n in names}
    per["total"] = _median([sum(r["cpu_s"][n] for n in names) / (r["completed"] / 1000) for r in runs])
    return per


def agent_detail(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per agent: microseconds per request spent runnable but waiting for a CPU.

    (The user/system split of /proc is not reported: the kernel keeps both counters monotonic by
    rescaling them, so the split of a few seconds' difference can be far off. perf, in the profile, is
    the reliable way to see the kernel's share.)
    """
    runs = [r for r in runs if r["completed"] and r.get("runq_s")]
    if not runs:
        return {}
    names = sorted(_agents(runs[0]["cpu_s"]))
    return {n: {"runq_us_per_request": _median([r["runq_s"][n] / r["completed"] * 1e6 for r in runs])}
            for n in names}


def goal_rows(summary: dict[str, Any], goals: dict[str, float]) -> list[dict[str, Any]]:
    bulk, rate, hundred = summary["bulk"], summary["rate"], summary["hundred_pods"]
    cpu = rate["mesh"].get("cpu_s_per_1000", {})
    worst_agent = max((v for k, v in cpu.items() if k != "total"), default=float("nan"))
    rss = max(hundred["memory_ready"]["rss"], hundred["memory_after"]["rss"])
    rows = [
        ("mesh bulk / direct bulk", ">=", goals["bulk_ratio_min"], bulk["mesh"]["vs_direct"], "x"),
        ("p90 added by the mesh (ms)", "<=", goals["added_p90_ms_max"], rate["mesh"]["added"]["p90"], "ms"),
        ("agent CPU s per 1000 requests (busier agent)", "<=", goals["cpu_s_per_1000_max"], worst_agent, "s"),
        (f"agent RSS with {hundred['pods_on_node']} pods (MiB)", "<=", goals["rss_mib_max"], rss, "MiB"),
    ]
    out = []
    for name, op, target, measured, unit in rows:
        met = measured >= target if op == ">=" else measured <= target
        factor = (target / measured if op == ">=" else measured / target) if measured and target else float("nan")
        out.append({"goal": name, "target": f"{op} {target:g}", "limit": target, "measured": measured, "met": bool(met),
                    "unit": unit, "miss_factor": None if met else factor})
    return out


def summarize(main_lab: dict[str, Any], hundred: dict[str, Any], goals: dict[str, float],
              env: dict[str, Any]) -> dict[str, Any]:
    run = main_lab["run"]
    mib = env["settings"]["bulk_mib"]
    h_runs = hundred["rate"]
    summary: dict[str, Any] = {
        "environment": env,
        "redirection": main_lab["redirection"],
        "mesh_start_s": main_lab["mesh_start_s"],
        "notes": run.notes,
        "bulk": summarize_bulk(run.bulk, mib),
        "rate": summarize_rate(run.rate),
        "agent_idle_cpu_s_per_s": main_lab["idle_cpu_s_per_s"],
        "agent_memory_1pod": {"ready": main_lab["memory_1pod_ready"], "after": main_lab["memory_1pod_after"]},
        "mesh_bytes_counted_by_destination": main_lab["mesh_bytes_counted"],
        "profile": main_lab.get("profile"),
        "hundred_pods": {
            **{k: v for k, v in hundred.items() if k != "rate"},
            "rate": {q: _median([r[q] for r in h_runs]) for q in (*PERCENTILES, "max")},
            "cpu_s_per_1000": cpu_per_1000(h_runs),
            "agents": agent_detail(h_runs),
            "lost": sum(r["lost"] for r in h_runs),
        },
    }
    summary["goals"] = goal_rows(summary, goals)
    return summary


# ---- Markdown ------------------------------------------------------------------------------------------


def _f(x: float, nd: int = 2) -> str:
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def markdown(s: dict[str, Any]) -> str:
    env = s["environment"]
    st = env["settings"]
    lines = [
        "# Mesh benchmark: direct vs mesh vs stunnel4, in one netns lab",
        "",
        f"{env['cores']} cores, kernel {env['kernel']}, Python {env['python']}; load average "
        f"{env['load_before']:.2f} before, {env['load_after']:.2f} after; {env['elapsed_s']:.0f} s in all. "
        f"Redirection: {s['redirection']}. {st['runs']} rounds, modes interleaved (order rotated per round); "
        "figures are medians over rounds. The two nodes share this machine's cores, so on the mesh path four "
        "busy processes (two apps, two agents) compete for them.",
        "",
        "## Goals",
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
    ]
    for g in s["goals"]:
        verdict = "yes" if g["met"] else f"no ({g['miss_factor']:.1f}x off)"
        lines.append(f"| {g['goal']} | {g['target']} | {_f(g['measured'], 3)} | {verdict} |")
    bulk = s["bulk"]
    lines += ["", f"## (a) Bulk: one connection, {st['bulk_mib']} MiB one way, cross-node", "",
              "| mode | MB/s (median) | runs | vs direct | proxy CPU s/GB (both ends) |", "|---|---|---|---|---|"]
    for mode, b in bulk.items():
        cpu = b.get("cpu_s_per_gb", {})
        lines.append(f"| {mode} | {b['median_mbps']:.0f} | {' '.join(f'{x:.0f}' for x in b['runs_mbps'])} | "
                     f"{b['vs_direct']:.2f} | {_f(cpu.get('total', float('nan')))} |")
    if "mesh" in bulk and "stunnel" in bulk:
        lines += ["", f"Mesh / stunnel4 bulk: {bulk['mesh']['median_mbps'] / bulk['stunnel']['median_mbps']:.2f}x."]
    rate = s["rate"]
    lines += ["", f"## (b) 1 KiB request/response, {st['rate']:.0f} req/s open loop over {st['conns']} connections, "
              f"{st['seconds']:g} s per run", "",
              "Latency from each request's due time to its full answer (ms). Added = mode minus direct, paired "
              "by round.", "",
              "| mode | p50 | p90 | p99 | max | added p50 | added p90 | added p99 | lost | max send lag |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in rate.items():
        add = r.get("added", {})
        lines.append(f"| {mode} | {_f(r['p50'], 3)} | {_f(r['p90'], 3)} | {_f(r['p99'], 3)} | {_f(r['max'], 1)} | "
                     f"{_f(add.get('p50', float('nan')), 3)} | {_f(add.get('p90', float('nan')), 3)} | "
                     f"{_f(add.get('p99', float('nan')), 3)} | {r['lost']} | {r['max_send_lag_ms']:.1f} |")
    h = s["hundred_pods"]
    cpu1 = rate["mesh"].get("cpu_s_per_1000", {})
    cpu100 = h["cpu_s_per_1000"]
    idle1, idle100 = s["agent_idle_cpu_s_per_s"], h["idle_cpu_s_per_s"]
    m1 = s["agent_memory_1pod"]
    lines += ["", "## (c) Agent cost", "",
              "CPU seconds (user+system, all threads) per 1000 requests of (b); CPU wait = time per request the "
              "agent was runnable but had no core (other processes' doing); idle = CPU seconds per second with no "
              "traffic. Memory in MiB: RSS = anonymous + file-backed (shared libraries count).", "",
              "| lab | agent | CPU s / 1000 req | CPU wait µs/req | idle CPU s/s | RSS ready | "
              "RSS after load | anon | file | peak |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    rows = [("1 enrolled pod per node", n, cpu1, rate["mesh"].get("agents", {}), idle1, m1["ready"][n], m1["after"][n])
            for n in sorted(m1["ready"])]
    rows.append((f"{h['pods_on_node']} enrolled pods on node-a", "agent-node-a", cpu100, h.get("agents", {}), idle100,
                 h["memory_ready"], h["memory_after"]))
    for lab, name, cpu, detail, idle, ready, after in rows:
        d = detail.get(name, {})
        lines.append(f"| {lab} | {name} | {_f(cpu.get(name, nan), 3)} | "
                     f"{_f(d.get('runq_us_per_request', nan), 0)} | {_f(idle.get(name, nan), 4)} | "
                     f"{ready['rss']:.1f} | {after['rss']:.1f} | {after['anon']:.1f} | {after['file']:.1f} | "
                     f"{after['peak']:.1f} |")
    lines += ["", f"Both agents together: {_f(cpu1.get('total', float('nan')), 3)} CPU s per 1000 requests "
              f"(1 pod per node), {_f(cpu100.get('total', float('nan')), 3)} with {h['pods_on_node']} pods. "
              f"With {h['pods_on_node']} pods: {h['captured']} captured by node-a's agent, mesh ready "
              f"{h['mesh_ready_s']:.1f} s after start (lab built in {h['lab_up_s']:.1f} s), {h['threads']} threads, "
              f"latency p50/p90/p99 {_f(h['rate']['p50'], 3)}/{_f(h['rate']['p90'], 3)}/{_f(h['rate']['p99'], 3)} ms.",
              "", "Largest resident mappings of that agent (MiB): "
              + ", ".join(f"{Path(n).name or n} {mb:.1f}" for n, mb in h["largest_mappings"]) + "."]
    if s["notes"]:
        lines += ["", "Notes: " + "; ".join(s["notes"]) + "."]
    return "\n".join(lines)


# ---- plot ---------------------------------------------------------------------------------------------


def plot(s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    colors = {"direct": "#4c72b0", "mesh": "#dd8452", "stunnel": "#55a868"}
    goals = {g["unit"]: g for g in s["goals"]}

    ax = axes[0][0]
    modes = list(s["bulk"])
    ax.bar(modes, [s["bulk"][m]["median_mbps"] for m in modes], color=[colors.get(m, "grey") for m in modes])
    for i, m in enumerate(modes):
        ax.scatter([i] * len(s["bulk"][m]["runs_mbps"]), s["bulk"][m]["runs_mbps"], color="black", s=10, zorder=3)
    if "direct" in s["bulk"]:
        ax.axhline(s["bulk"]["direct"]["median_mbps"] * 0.5, color="red", ls="--", lw=1, label="goal: 50% of direct")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title("(a) bulk, one connection cross-node (median, dots = runs)")
    ax.set_ylabel("MB/s")

    ax = axes[0][1]
    width = 0.25
    for j, m in enumerate(s["rate"]):
        xs = [i + (j - 1) * width for i in range(len(PERCENTILES))]
        ax.bar(xs, [s["rate"][m][q] for q in PERCENTILES], width, label=m, color=colors.get(m, "grey"))
    if "direct" in s["rate"]:
        ax.axhline(s["rate"]["direct"]["p90"] + goals["ms"]["limit"], color="red", ls="--", lw=1,
                   label="goal for p90: direct + 0.5 ms")
    ax.set_xticks(range(len(PERCENTILES)), PERCENTILES)
    ax.set_ylabel("ms from due time")
    ax.set_title(f"(b) 1 KiB req/resp at {s['environment']['settings']['rate']:.0f}/s, 4 connections")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    cpu1 = s["rate"]["mesh"].get("cpu_s_per_1000", {})
    cpu100 = s["hundred_pods"]["cpu_s_per_1000"]
    labels = [f"{k}\n1 pod/node" for k in sorted(cpu1) if k != "total"]
    values = [cpu1[k] for k in sorted(cpu1) if k != "total"]
    if "agent-node-a" in cpu100:
        labels.append(f"agent-node-a\n{s['hundred_pods']['pods_on_node']} pods")
        values.append(cpu100["agent-node-a"])
    ax.bar(labels, values, color="#dd8452")
    ax.axhline(goals["s"]["limit"], color="red", ls="--", lw=1, label="goal")
    ax.set_ylabel("CPU s per 1000 requests")
    ax.set_title("(c) agent CPU")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    m1 = s["agent_memory_1pod"]["after"]
    h = s["hundred_pods"]
    labels = [f"{k}\n1 pod/node" for k in sorted(m1)] + [f"agent-node-a\n{h['pods_on_node']} pods"]
    mems = [m1[k] for k in sorted(m1)] + [h["memory_after"]]
    anon = [m["anon"] for m in mems]
    ax.bar(labels, anon, color="#c44e52", label="anonymous")
    ax.bar(labels, [m["file"] for m in mems], bottom=anon, color="#8172b2", label="file-backed")
    ax.axhline(goals["MiB"]["limit"], color="red", ls="--", lw=1, label="goal")
    ax.set_ylabel("resident MiB")
    ax.set_title("(c) agent resident memory after load")
    ax.legend(fontsize=8)

    fig.suptitle(f"nodemesh mesh benchmark ({s['environment']['cores']} cores, one machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile_text(profile: dict[str, Any]) -> str:
    out = ["Where the agents' time goes: one extra mesh run of each load, sampled (not a measured run).",
           "perf: on-CPU samples by binary. py-spy: Python functions, as shares of the samples where the agent",
           "worked (samples whose leaf is a wait, such as the event loop's epoll, are counted apart).", ""]
    if "error" in profile:
        return "\n".join([*out, str(profile["error"]), ""])
    for key, tools in profile.items():
        out.append(f"== {key}")
        perf = tools.get("perf", {})
        if "dso" in perf:
            out.append("   perf: " + ", ".join(f"{Path(d).name} {pct:.1f}%" for d, pct in perf["dso"]))
        elif perf:
            out.append(f"   perf error: {perf.get('error')}")
        spy = tools.get("py-spy", {})
        if "error" in spy:
            out.append(f"   py-spy error: {spy['error']}")
        elif spy:
            out.append(f"   py-spy: {spy['samples']} working samples ({spy['waiting_samples']} waiting left out)")
            out.append("   self (leaf frame):")
            out += [f"     {pct:5.1f}%  {name}" for name, pct in spy["self"]]
            out.append("   total (anywhere on the stack):")
            out += [f"     {pct:5.1f}%  {name}" for name, pct in spy["total"]]
        out.append("")
    return "\n".join(out)
