"""Routing, resilience and L7 authorization through the running waypoint, with Envoy's observable
behaviour: weighted splits within statistical bounds, retries counted attempt by attempt, per-try and
route timeouts, fault injection with its flags, circuit-breaker overflow, outlier ejection, RBAC denies.
Statistical bounds are five standard deviations of the binomial, so a correct waypoint fails them about
once in three million runs; no assertion depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import math

import pytest

from tests.test_waypoint_server_env import CLIENT_ID, grpc_frame, waypoint_env
from waypoint.filters import Filter, PeerIdentityHeader
from waypoint.flags import LocalReply

pytestmark = pytest.mark.timeout(120)


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    sd = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= sigmas * sd


async def clients(env, n: int = 8, service: str = "web"):
    return [await env.h1(service) for _ in range(n)]


async def spread(conns, total: int, method: str = "GET", path: str = "/", headers=None):
    """`total` requests over the keep-alive connections, each connection sequential, all concurrently."""
    per = [total // len(conns) + (1 if i < total % len(conns) else 0) for i in range(len(conns))]

    async def run(c, k):
        return [await c.request(method, path, headers) for _ in range(k)]

    batches = await asyncio.gather(*(run(c, k) for c, k in zip(conns, per, strict=True)))
    return [r for b in batches for r in b]


async def test_weighted_split_80_20_over_1000_requests():
    async with waypoint_env(seed=1) as env:
        env.apply("""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs:
    - {name: web-v1, port: 80, weight: 80}
    - {name: web-v2, port: 80, weight: 20}
""")
        replies = await spread(await clients(env), 1000)
        assert all(r.status == 200 for r in replies)
        v1 = sum(1 for r in replies if r.headers["x-pod"] == "web-v1")
        assert within(v1, 1000, 0.8), v1
        assert env.hits()["web-v1"] == v1 and env.hits()["web-v2"] == 1000 - v1


async def test_retries_count_attempts_exactly_and_end_with_urx():
    async with waypoint_env() as env:
        env.apply("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web}}]
    retries: {attempts: 3, retryOn: "503"}
""")
        for pod in env.pods.values():
            pod.fail_status = 503
        client = await env.h1()
        r = await client.request("GET", "/")
        assert r.status == 503 and r.json()["pod"] in env.pods  # the last upstream answer is returned
        attempts = sorted(a for p in env.pods.values() for a in p.attempt_headers)
        assert attempts == ["1", "2", "3", "4"]
        line = env.log_lines[-1]
        assert " 503 URX via_upstream " in line
        # A retriable code not in retryOn is not retried.
        env.reset_hits()
        for pod in env.pods.values():
            pod.fail_status = 500
        assert (await client.request("GET", "/")).status == 500
        assert sum(env.hits().values()) == 1


async def test_retries_stop_at_the_per_try_and_the_route_timeout():
    async with waypoint_env() as env:
        env.apply("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /per-try}}]
    route: [{destination: {host: web}}]
    retries: {attempts: 2, perTryTimeout: 0.2s, retryOn: 5xx}
  - match: [{uri: {prefix: /route}}]
    route: [{destination: {host: web}}]
    timeout: 0.5s
    retries: {attempts: 10, perTryTimeout: 0.2s, retryOn: 5xx}
""")
        for pod in env.pods.values():
            pod.delay = 2.0
        client = await env.h1()
        r = await client.request("GET", "/per-try")
        assert (r.status, r.body) == (504, b"upstream request timeout")
        assert sorted(a for p in env.pods.values() for a in p.attempt_headers) == ["1", "2", "3"]
        assert " 504 URX,UT upstream_per_try_timeout " in env.log_lines[-1]  # retries ran out on a per-try timeout
        env.reset_hits()
        client = await env.h1()
        r = await client.request("GET", "/route")
        assert (r.status, r.body) == (504, b"upstream request timeout")
        assert " 504 UT upstream_response_timeout " in env.log_lines[-1]
        attempts = sum(env.hits().values())
        assert 2 <= attempts <= 3  # 0.5 s of budget holds at most three 0.2 s tries, never eleven
        seen = [p.attempt_headers for p in env.pods.values()]
        assert all(h != "" for hs in seen for h in hs)


async def test_expected_timeout_header_and_client_overrides():
    async with waypoint_env() as env:
        env.apply("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web}}]
    timeout: 3s
""")
        client = await env.h1()
        seen = (await client.request("GET", "/")).json()["headers"]
        assert 2900 <= int(seen["x-envoy-expected-rq-timeout-ms"]) <= 3000
        seen = (await client.request("GET", "/", [("x-envoy-upstream-rq-timeout-ms", "700"),
                                                  ("x-envoy-max-retries", "1")])).json()["headers"]
        assert 600 <= int(seen["x-envoy-expected-rq-timeout-ms"]) <= 700
        assert "x-envoy-upstream-rq-timeout-ms" not in seen and "x-envoy-max-retries" not in seen


async def test_fault_abort_half_of_requests_with_flag_fi():
    async with waypoint_env(seed=7) as env:
        env.apply("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
""")
        replies = await spread(await clients(env), 600)
        aborted = [r for r in replies if r.status == 503]
        assert within(len(aborted), 600, 0.5), len(aborted)
        assert all(r.body == b"fault filter abort" for r in aborted)
        assert all(r.status == 200 for r in replies if r not in aborted)
        assert sum(env.hits().values()) == 600 - len(aborted)  # aborts never reach (or retry to) an upstream
        assert env.metric("istio_requests_total", response_code="503", response_flags="FI") == len(aborted)
        assert sum(" 503 FI fault_filter_abort " in line for line in env.log_lines) == len(aborted)


async def test_fault_delay_is_flagged_di_and_grpc_abort_is_trailers_only():
    async with waypoint_env() as env:
        env.apply("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web}}]
    fault: {delay: {fixedDelay: 0.05s, percentage: {value: 100}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc, namespace: default}
spec:
  hosts: [grpc]
  http:
  - route: [{destination: {host: grpc}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
""")
        client = await env.h1()
        assert (await client.request("GET", "/")).status == 200
        assert " 200 DI via_upstream " in env.log_lines[-1]
        h2 = await env.h2()
        r = await h2.request("POST", "/pkg.Echo/Say", [("content-type", "application/grpc")], grpc_frame(b"x"))
        assert (r.status, r.headers["grpc-status"], r.headers["grpc-message"]) == (200, "14", "fault filter abort")
        await h2.close()


async def test_circuit_breaker_overflow_gives_503_uo():
    async with waypoint_env() as env:
        env.apply("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.default.svc.cluster.local
  trafficPolicy:
    connectionPool: {http: {http2MaxRequests: 1}}
""")
        conns = await clients(env, 5)
        slow = asyncio.ensure_future(conns[0].request("GET", "/delay/1500"))
        await asyncio.sleep(0.3)  # the slow request holds the only slot for well over a second
        rest = await asyncio.gather(*(c.request("GET", "/") for c in conns[1:]))
        assert all(r.status == 503 for r in rest)
        assert all(r.headers.get("x-envoy-overloaded") == "true" for r in rest)
        assert (await slow).status == 200
        assert env.metric("istio_requests_total", response_code="503", response_flags="UO") == 4
        assert (await conns[1].request("GET", "/")).status == 200  # the slot is free again


async def test_pending_requests_over_the_connection_ceiling_overflow():
    async with waypoint_env(pods={"solo": {"app": "web"}}) as env:
        env.apply("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.default.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
""")
        conns = await clients(env, 4)
        replies = await asyncio.gather(*(c.request("GET", "/delay/700") for c in conns))
        codes = sorted(r.status for r in replies)
        assert codes == [200, 200, 503, 503]  # one on the connection, one pending, two overflow


async def test_outlier_ejected_endpoint_receives_nothing_until_its_ejection_ends():
    async with waypoint_env(seed=3) as env:
        env.apply("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.default.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, interval: 0.5s, baseEjectionTime: 2s, maxEjectionPercent: 100}
""")
        env.pods["web-v1"].fail_status = 500
        client = await env.h1()
        for _ in range(40):
            await client.request("GET", "/")
            if env.pods["web-v1"].hits >= 2:
                break
        assert env.pods["web-v1"].hits == 2
        cluster = next(c for c in env.app.clusters.all() if c.name.endswith("|web.default.svc.cluster.local"))
        host = next(iter(cluster.outlier.ejected()))
        ends = cluster.outlier.ejection_ends(host)
        env.reset_hits()
        loop = asyncio.get_running_loop()
        sent = 0
        while loop.time() < ends - 0.3 and sent < 200:
            assert (await client.request("GET", "/")).status == 200
            sent += 1
        assert sent >= 5
        assert env.pods["web-v1"].hits == 0  # nothing while ejected
        await asyncio.sleep(max(0.0, ends - loop.time()) + 0.05)
        env.pods["web-v1"].fail_status = None
        for _ in range(60):
            await client.request("GET", "/")
            if env.pods["web-v1"].hits:
                break
        assert env.pods["web-v1"].hits >= 1  # back in rotation once its time is up


async def test_l7_authorization_deny_and_allow():
    async with waypoint_env() as env:
        env.apply(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: default}}
spec:
  targetRefs: [{{group: "", kind: Service, name: web}}]
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/admin*"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-sleep, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  action: ALLOW
  rules: [{{from: [{{source: {{principals: ["{str(CLIENT_ID)[len('spiffe://'):]}"]}}}}]}}]
""")
        client = await env.h1()
        r = await client.request("GET", "/admin/users")
        assert (r.status, r.body) == (403, b"RBAC: access denied")
        assert " 403 - rbac_access_denied_matched_policy[ns[default]-policy[no-admin]-rule[0]] " in env.log_lines[-1]
        r = await client.request("GET", "/a/../admin")  # normalized before policy
        assert r.status == 403
        assert (await client.request("GET", "/ok")).status == 200
        intruder = await env.h1(cert=env.other_cert)
        r = await intruder.request("GET", "/ok")
        assert (r.status, r.body) == (403, b"RBAC: access denied")
        assert "rbac_access_denied_matched_policy[none]" in env.log_lines[-1]
        assert sum(env.hits().values()) == 1
        grpc = await env.h2(cert=env.other_cert)
        r = await grpc.request("POST", "/pkg.Echo/Say", [("content-type", "application/grpc")], grpc_frame(b"x"))
        assert (r.status, r.headers["grpc-status"], r.headers["grpc-message"]) == (200, "7", "RBAC: access denied")
        await grpc.close()


async def test_routes_no_match_rewrite_redirect_and_header_rules():
    async with waypoint_env() as env:
        env.apply("""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-tier, value: gold}]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-served-by, value: waypoint}]}
    backendRefs: [{name: web-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
""")
        client = await env.h1()
        r = await client.request("GET", "/api/items?q=1")
        seen = r.json()
        assert (r.status, seen["pod"], seen["path"]) == (200, "web-v2", "/v2/items?q=1")
        assert seen["headers"]["x-envoy-original-path"] == "/api/items?q=1"
        assert seen["headers"]["x-tier"] == "gold" and r.headers["x-served-by"] == "waypoint"
        r = await client.request("GET", "/old")
        assert (r.status, r.headers["location"]) == (301, "http://web.default.svc.cluster.local/new")
        r = await client.request("GET", "/elsewhere")
        assert r.status == 404
        assert " 404 NR route_not_found " in env.log_lines[-1]


async def test_filters_see_route_and_identity_and_can_answer():
    class Gate(Filter):
        name = "gate"

        def on_request(self, ctx):
            if ctx.headers.get("x-block") is not None:
                return LocalReply(429, b"slow down", (("retry-after", "1"),))
            ctx.state["seen"] = True
            return None

        async def on_response(self, ctx, response):
            response.headers.set("x-gate", "passed" if ctx.state.get("seen") else "blocked")

    async with waypoint_env(filters=[PeerIdentityHeader(), Gate()]) as env:
        client = await env.h1()
        r = await client.request("GET", "/", [("x-forwarded-client-identity", "forged")])
        assert r.json()["headers"]["x-forwarded-client-identity"] == str(CLIENT_ID)
        assert (r.headers["x-waypoint-route"], r.headers["x-gate"]) == ("default", "passed")
        r = await client.request("GET", "/", [("x-block", "1")])
        assert (r.status, r.body, r.headers["retry-after"], r.headers["x-waypoint-route"]) == (
            429, b"slow down", "1", "default")
        assert sum(env.hits().values()) == 1


async def test_trace_context_is_continued_and_b3_kept_consistent():
    async with waypoint_env() as env:
        client = await env.h1()
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        seen = (await client.request("GET", "/", [("traceparent", f"00-{trace}-00f067aa0ba902b7-01"),
                                                  ("x-b3-traceid", trace), ("x-b3-spanid", "00f067aa0ba902b7"),
                                                  ("x-b3-sampled", "1")])).json()["headers"]
        version, tid, span, flags = seen["traceparent"].split("-")
        assert (version, tid, flags) == ("00", trace, "01") and span != "00f067aa0ba902b7"
        assert (seen["x-b3-traceid"], seen["x-b3-spanid"], seen["x-b3-parentspanid"]) == (trace, span,
                                                                                          "00f067aa0ba902b7")


async def test_sampled_spans_are_exported_with_the_waypoint_span_id():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    async with waypoint_env(trace_exporter=exporter) as env:
        client = await env.h1()
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        seen = (await client.request("GET", "/x", [("traceparent", f"00-{trace}-00f067aa0ba902b7-01")])).json()
        await client.request("GET", "/y", [("traceparent", f"00-{'1' * 32}-{'2' * 16}-00")])  # not sampled
    spans = exporter.get_finished_spans()
    assert len(spans) == 1
    span = spans[0]
    assert f"{span.context.trace_id:032x}" == trace and f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert f"{span.context.span_id:016x}" == seen["headers"]["traceparent"].split("-")[2]
    assert span.attributes["http.status_code"] == 200 and span.attributes["response_flags"] == "-"


async def test_many_requests_leave_no_connections_or_counters_behind():
    async with waypoint_env() as env:
        conns = await clients(env, 4)
        replies = await spread(conns, 100)
        assert all(r.status == 200 for r in replies)
        cluster = next(c for c in env.app.clusters.all() if c.name.endswith("|web.default.svc.cluster.local"))
        assert sum(cluster.active.values()) == 0
        assert env.app.upstream.connections <= 8  # reused per endpoint, not one per request


async def test_config_files_apply_live_and_a_bad_update_keeps_the_last_good_routes(tmp_path, caplog):
    from waypoint.configsource import ConfigDirSource

    route = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: pin, namespace: default}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web}}]
  rules:
  - matches: [{{path: {{type: {kind}, value: /}}}}]
    backendRefs: [{{name: web-v2, port: 80}}]
"""
    async with waypoint_env() as env:
        source = ConfigDirSource(env.app.config, [tmp_path], interval=0.05)
        (tmp_path / "route.yaml").write_text(route.format(kind="PathPrefix"))
        source.start()
        try:
            client = await env.h1()
            assert {(await client.request("GET", "/")).headers["x-pod"] for _ in range(10)} == {"web-v2"}
            (tmp_path / "route.yaml").write_text(route.format(kind="Prefix"))
            for _ in range(100):
                await asyncio.sleep(0.05)
                if any("rejected" in r.getMessage() for r in caplog.records):
                    break
            message = next(r.getMessage() for r in caplog.records if "rejected" in r.getMessage())
            assert "HTTPRoute default/pin: spec.rules[0].matches[0].path.type: must be one of" in message
            assert "previously accepted version stays in force" in message
            assert {(await client.request("GET", "/")).headers["x-pod"] for _ in range(10)} == {"web-v2"}
            (tmp_path / "route.yaml").unlink()  # removed from the files: removed from the waypoint
            for _ in range(100):
                await asyncio.sleep(0.05)
                if not env.app.config.snapshot().resources:
                    break
            pods = {(await client.request("GET", "/")).headers["x-pod"] for _ in range(40)}
            assert pods == {"web-v1", "web-v2"}
        finally:
            await source.stop()


async def test_ip_blocks_see_the_tunnel_source_not_a_forged_forwarded_header():
    from mesh.hbone import TunnelRequest
    from tests.test_waypoint_server_env import H1Client

    async with waypoint_env() as env:
        env.apply("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-one-ip, namespace: default}
spec:
  targetRefs: [{group: "", kind: Service, name: web}]
  action: ALLOW
  rules: [{from: [{source: {ipBlocks: ["127.0.9.1/32"]}}]}]
""")
        honest = await env.h1()  # leaves from 127.0.9.1
        assert (await honest.request("GET", "/ok")).status == 200
        req = TunnelRequest(authority=f"{env.vip('web')}:80", src_addr=("127.0.9.1", 40000))
        t = await env.pool.connect(env.client_cert, env.waypoint, ["spiffe://cluster.local/ns/default/sa/waypoint"],
                                   req, source_ip="127.0.9.7")  # claims 127.0.9.1, comes from 127.0.9.7
        r, w = t.streams()
        forged = H1Client(r, w, t)
        assert (await forged.request("GET", "/ok")).status == 403
