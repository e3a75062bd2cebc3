"""What a process costs, read from /proc: CPU seconds so far and resident memory.

A process's own /proc/<pid>/stat counts the CPU of all its threads (the agent's namespace helper threads
included), so one read per process is enough. Resident memory is given whole (VmRSS, what `top` and
Kubernetes' working-set figures start from) and split into anonymous and file-backed pages: shared
libraries mapped by the process count in VmRSS, and which of the two grows says where to look.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all threads) since it started."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK  # utime, stime


def runqueue_wait(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (schedstat's run_delay).

    On a shared machine this is the part of a proxy's latency that is other processes' doing.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


@dataclass(frozen=True)
class Sample:
    """Counters of one process at one moment; subtract two to get what happened in between."""

    user: float
    system: float
    runq_wait: float

    def __sub__(self, other: Sample) -> Sample:
        return Sample(self.user - other.user, self.system - other.system, self.runq_wait - other.runq_wait)

    @property
    def cpu(self) -> float:
        return self.user + self.system


def sample(pid: int) -> Sample:
    user, system = cpu_split(pid)
    return Sample(user, system, runqueue_wait(pid))


@dataclass(frozen=True)
class Memory:
    """Resident memory in MiB (1 MiB = 2^20 bytes)."""

    rss: float
    anon: float
    file: float
    peak: float  # VmHWM: the highest VmRSS so far

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in asdict(self).items()}


def memory(pid: int) -> Memory:
    kib: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            kib[key] = int(value.split()[0])
    return Memory(rss=kib["VmRSS"] / 1024, anon=kib["RssAnon"] / 1024,
                  file=(kib["RssFile"] + kib.get("RssShmem", 0)) / 1024, peak=kib["VmHWM"] / 1024)


def largest_mappings(pid: int, top: int = 8) -> list[tuple[str, float]]:
    """The mapped files (or [heap], anonymous) holding the most resident memory, in MiB."""
    per: Counter[str] = Counter()
    current = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if not head:
            continue
        if not head[0].endswith(":"):  # a mapping's header line: address perms offset dev inode [path]
            current = head[5] if len(head) > 5 else "[anonymous]"
        elif head[0] == "Rss:":
            per[current] += int(head[1])
    return [(name, kib / 1024) for name, kib in per.most_common(top)]


# Leaf frames where a thread waits rather than works. py-spy cannot always tell an idle thread from a
# busy one (it judges by the thread's OS state at the sampled instant), so these are counted apart.
WAITS = ("EpollSelector.select", "_worker", "NetnsWorker._loop", "Condition.wait", "Event.wait", "Thread.join")


def collapsed_top(path: Path, top: int = 15) -> dict[str, Any]:
    """Top functions of a py-spy ``--format raw`` profile, as shares of the working (non-waiting) samples.

    ``self``: the function was the leaf frame; ``total``: it was anywhere on the stack. Frames look like
    ``name (file.py:123)``; line numbers are dropped so one function is one row.
    """
    self_count: Counter[str] = Counter()
    total_count: Counter[str] = Counter()
    samples = waiting = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if frames[-1].split(" (")[0] in WAITS:
            waiting += count
            continue
        samples += count
        self_count[frames[-1]] += count
        for name in set(frames):
            total_count[name] += count
    share = (lambda n: 100.0 * n / samples) if samples else (lambda n: 0.0)
    return {
        "samples": samples,
        "waiting_samples": waiting,
        "self": [(name, share(n)) for name, n in self_count.most_common(top)],
        "total": [(name, share(n)) for name, n in total_count.most_common(top) if share(n) < 99.5],
    }


def _frame_name(frame: str) -> str:
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    file = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({file})"


def perf_dso_split(data: Path, top: int = 6) -> dict[str, Any]:
    """Where on-CPU time went by binary (kernel, libcrypto, libpython, libc...), from a ``perf record`` file."""
    res = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio",
                          "-g", "none"], capture_output=True, text=True, timeout=120, check=False)
    rows = []
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith("%") and not line.lstrip().startswith("#"):
            with contextlib.suppress(ValueError):
                rows.append((parts[1], float(parts[0].rstrip("%"))))
    if not rows:
        return {"error": (res.stderr or "perf report gave nothing")[-300:]}
    return {"dso": rows[:top]}
