"""The waypoint's per-request decision cost: routing, L7 authorization, load balancing, retry bookkeeping.

Every request through a waypoint pays for these pure decisions before a byte goes upstream, so they
must stay a small fraction of the HTTP/2 and TLS work. Compared side by side in the same run, medians
of several runs (microseconds per decision, lower is better):

* ``route()`` on tables of 1, 16 and 128 HTTPRoute rules, the matching rule last (worst case);
* regex matching with RE2 (what the waypoint uses, linear time) against Python's backtracking ``re``
  (the peer), on a benign pattern and on a pathological one where ``re`` blows up (bounded input);
* ``authz.evaluate`` with 1 and 10 ALLOW/DENY policies;
* the load balancers: P2C, weighted round robin, ring hash, Maglev;
* a full retry cycle (3 attempts) of the retry state machine.

Results: ``bench/results/waypoint_core.{md,json}``. Bounded: each case stops after its iterations or
``CASE_BUDGET_S``, whichever comes first.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from waypoint.authz import evaluate
from waypoint.config import ConfigStore
from waypoint.config.model import ServiceRef
from waypoint.config.regex import compile_re2
from waypoint.lb import Endpoint, LbContext, LeastRequest, Maglev, RingHash, RoundRobin, hash64
from waypoint.resilience.retry import RetryPolicy, RetryState, UpstreamResponse
from waypoint.routing import Headers, RequestView, route

RUNS = 5
ITERATIONS = 2000
CASE_BUDGET_S = 3.0
RESULTS = Path(__file__).parent / "results"
SVC = ServiceRef("default", "svc")


def _table(rules: int):
    """`rules` equal-precedence rules spread over HTTPRoutes of at most 16 rules (the CRD's limit)."""
    store = ConfigStore()
    for route_no in range((rules + 15) // 16):
        body = "\n".join(
            f"  - matches: [{{path: {{type: PathPrefix, value: /api}}, headers: [{{name: x-tenant, value: t{i}}}]}}]\n"
            f"    backendRefs: [{{name: b{i}, port: 80}}]"
            for i in range(route_no * 16, min(rules, route_no * 16 + 16))
        )
        result = store.apply(yaml.safe_load(f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r{route_no:03d}, namespace: default}}
spec:
  parentRefs: [{{group: "", kind: Service, name: svc}}]
  rules:
{body}
"""))
        assert result.accepted, result.message
    table = store.snapshot().route_table(SVC)
    assert len(table.entries) == rules
    return table


def _policies(n: int):
    store = ConfigStore()
    for i in range(n):
        result = store.apply(yaml.safe_load(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p{i}, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: svc}}]
  action: {"DENY" if i % 2 else "ALLOW"}
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/ns{i}/sa/*"]}}}}]
    to: [{{operation: {{methods: [GET, POST], paths: ["/api/{i}/*"]}}}}]
"""))
        assert result.accepted, result.message
    return store.snapshot().authz_policies(SVC)


def _measure(fn: Callable[[], object], iterations: int = ITERATIONS) -> float:
    """Median over RUNS of the mean microseconds per call."""
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        done = 0
        while done < iterations and time.perf_counter() - start < CASE_BUDGET_S / RUNS:
            fn()
            done += 1
        samples.append((time.perf_counter() - start) / max(done, 1) * 1e6)
    return statistics.median(samples)


def _cases() -> list[tuple[str, str, Callable[[], object], int]]:
    rng = random.Random(1)
    cases: list[tuple[str, str, Callable[[], object], int]] = []
    for n in (1, 16, 128):
        table = _table(n)
        # Equal precedence everywhere, so rule order decides and the last rule is tried last.
        request = RequestView("GET", "/api/items?x=1", "svc", headers=Headers({"x-tenant": f"t{n - 1}"}))
        cases.append(("routing", f"route(), {n} rules, last matches", lambda t=table, r=request: route(r, t, rng=rng),
                      ITERATIONS))
    benign = r"/api/v[0-9]+/items/[a-z0-9-]+"
    path = "/api/v2/items/" + "a" * 40
    cases.append(("regex", "RE2 (waypoint), benign pattern", lambda: compile_re2(benign).fullmatch(path), ITERATIONS))
    py = re.compile(benign)
    cases.append(("regex", "Python re (peer), benign pattern", lambda: py.fullmatch(path), ITERATIONS))
    evil = r"(a+)+b"
    subject = "a" * 22
    cases.append(("regex", "RE2 (waypoint), (a+)+b on 22 a's", lambda: compile_re2(evil).fullmatch(subject), 200))
    py_evil = re.compile(evil)
    cases.append(("regex", "Python re (peer), (a+)+b on 22 a's", lambda: py_evil.fullmatch(subject), 3))
    for n in (1, 10):
        policies = _policies(n)
        req = RequestView("GET", "/api/0/x", "svc:80", source_principal="cluster.local/ns/ns0/sa/app")
        cases.append(("authz", f"evaluate(), {n} policies", lambda p=policies, r=req: evaluate(p, r), ITERATIONS))
    hosts = [Endpoint(f"10.0.0.{i}:80") for i in range(50)]
    weighted = [Endpoint(f"10.0.1.{i}:80", 1 + i % 3) for i in range(50)]
    ctx = LbContext(active_requests=lambda h: hash(h.address) % 7)
    for name, lb, hs in (("P2C least request", LeastRequest(rng), hosts),
                         ("weighted round robin (EDF)", RoundRobin(rng), weighted),
                         ("ring hash (1024)", RingHash(1024), hosts),
                         ("maglev (65537)", Maglev(65537), hosts)):
        lb.choose(hs, LbContext(hash_key=1))  # build tables outside the timing
        keyed = LbContext(hash_key=hash64("user-42"), active_requests=ctx.active_requests)
        cases.append(("load balancing", f"{name}, 50 hosts", lambda b=lb, h=hs, c=keyed: b.choose(h, c), ITERATIONS))
    policy = RetryPolicy(num_retries=2, retry_on=frozenset({"5xx"}))

    def retry_cycle() -> None:
        state = RetryState(policy, now=0.0, route_timeout=10.0, rng=rng)
        for outcome in (UpstreamResponse(503), UpstreamResponse(503), UpstreamResponse(200)):
            state.begin_attempt(0.0)
            state.on_outcome(outcome, 0.0)

    cases.append(("retries", "3-attempt retry cycle", retry_cycle, ITERATIONS))
    return cases


def main() -> int:
    rows = []
    for group, name, fn, iterations in _cases():
        micros = _measure(fn, iterations)
        rows.append({"group": group, "case": name, "us_per_op": round(micros, 2)})
        print(f"{group:15} {name:45} {micros:12.2f} us", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "waypoint_core.json").write_text(json.dumps(rows, indent=2))
    lines = ["| group | case | µs per decision (median of 5) |", "| --- | --- | ---: |"]
    lines += [f"| {r['group']} | {r['case']} | {r['us_per_op']} |" for r in rows]
    (RESULTS / "waypoint_core.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
