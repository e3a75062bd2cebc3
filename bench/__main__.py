"""Run the benchmarks: every `bench/bench_*.py` with a `main()`, or only those named on the command line.

Each benchmark is bounded in time, compares against the direct path and independent peers in the same run,
reports medians of several runs, and writes its table (and JSON) under `bench/results/`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def main(argv: list[str]) -> int:
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    wanted = [n if n.startswith("bench_") else f"bench_{n}" for n in argv] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; have: {', '.join(names)}", file=sys.stderr)
        return 2
    rc = 0
    for name in wanted:
        mod = importlib.import_module(f"bench.{name}")
        print(f"== {name}", flush=True)
        rc |= int(mod.main() or 0)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
