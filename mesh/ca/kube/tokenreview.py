"""Node agents authenticated by their Kubernetes service-account token, checked with TokenReview.

The agent sends its projected token (audience `nodemesh-ca`) as `Authorization: Bearer ...` over TLS; the
CA has no client certificate to check in this mode. For each request the CA asks the API server whether
the token is valid for that audience (TokenReview), then:

1. the token must belong to a trusted agent service account (`namespace/name`, a configurable list like
   Istio's `CA_TRUSTED_NODE_ACCOUNTS`): any other service account is refused with 403, even a valid one;
2. the node is the one the token is bound to: the `authentication.kubernetes.io/node-name` extra that
   bound tokens of recent Kubernetes carry, or else the node of the agent pod named by the
   `authentication.kubernetes.io/pod-name` extra, looked up in the CA's pod view (its uid must match the
   token's `pod-uid`, so a re-created pod of the same name is not mistaken for the old one). A token bound
   to no pod (a legacy secret token) names no node and is refused.

The node name is then all the signing path needs: it signs only identities with a pod on that node.

Successful reviews are cached for a few seconds (keyed by a hash of the token, never the token itself),
so a burst of certificate requests from one agent costs one TokenReview. Failures are not cached. When
the API server cannot be asked, the CA refuses with 503 (fail closed), and the agent retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from mesh.ca.kube.api import KubeApi, KubeApiError
from mesh.ca.kube.placement import PodFacts
from mesh.ca.nodeid import validate_node_name
from mesh.ca.placement import PlacementError
from mesh.ca.server import Refusal, WorkloadPrincipal
from mesh.identity import IdentityError

log = logging.getLogger("nodemesh.ca.kube")

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
DEFAULT_AUDIENCE = "nodemesh-ca"
DEFAULT_TRUSTED_AGENTS = ("nodemesh-system/nodemesh-agent",)
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SA_PREFIX = "system:serviceaccount:"
MAX_TOKEN_BYTES = 16 * 1024


class PodLookup(Protocol):
    def pod(self, namespace: str, name: str) -> PodFacts | None: ...


@dataclass(frozen=True)
class ReviewedToken:
    """What TokenReview said about a token: whose it is and what it is bound to."""

    namespace: str
    service_account: str
    extra: Mapping[str, tuple[str, ...]]

    def one(self, key: str) -> str | None:
        values = self.extra.get(key) or ()
        return values[0] if len(values) == 1 and values[0] else None


def parse_trusted_agents(value: str | Iterable[str]) -> frozenset[tuple[str, str]]:
    """`ns/sa,ns/sa` (or a list of `ns/sa`) -> {(ns, sa)}; ValueError naming the bad entry."""
    entries = value.split(",") if isinstance(value, str) else list(value)
    out = set()
    for raw in entries:
        entry = raw.strip()
        ns, sep, sa = entry.partition("/")
        if not sep or not ns or not sa or "/" in sa:
            raise ValueError(f"--trusted-agents: {entry!r} is not a service account: expected namespace/name")
        out.add((ns, sa))
    if not out:
        raise ValueError("--trusted-agents: at least one namespace/name is needed")
    return frozenset(out)


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Refusal("unauthenticated", "no bearer token: present the agent's service-account token "
                                         "(audience nodemesh-ca) in the Authorization header")
    if len(token) > MAX_TOKEN_BYTES or not token.isascii() or any(c.isspace() for c in token):
        raise Refusal("unauthenticated", "the bearer token is malformed")
    return token


def read_review(doc: Mapping[str, Any], audience: str) -> ReviewedToken:
    """The TokenReview answer as a ReviewedToken, or Refusal (401/403/503) saying why not."""
    status = doc.get("status")
    if not isinstance(status, Mapping):
        raise Refusal("auth_unavailable", "the TokenReview answer has no status")
    if status.get("authenticated") is not True:
        reason = status.get("error")
        why = f": {reason}" if isinstance(reason, str) and reason else ""
        raise Refusal("unauthenticated", f"the service-account token was not accepted by the API server{why}")
    audiences = status.get("audiences")
    if audiences is not None and (not isinstance(audiences, list) or audience not in audiences):
        raise Refusal("unauthenticated", f"the service-account token is not meant for audience {audience!r}")
    user = status.get("user")
    username = user.get("username") if isinstance(user, Mapping) else None
    if not isinstance(username, str) or not username.startswith(SA_PREFIX):
        raise Refusal("not_a_node", f"the token belongs to {username!r}, not to a service account")
    ns, sep, sa = username[len(SA_PREFIX):].partition(":")
    if not sep or not ns or not sa:
        raise Refusal("not_a_node", f"the token's user {username!r} is not a service account")
    raw_extra = user.get("extra") if isinstance(user, Mapping) else None
    extra: dict[str, tuple[str, ...]] = {}
    if isinstance(raw_extra, Mapping):
        for key, values in raw_extra.items():
            if isinstance(key, str) and isinstance(values, list):
                extra[key] = tuple(v for v in values if isinstance(v, str))
    return ReviewedToken(ns, sa, extra)


class TokenReviewAuthenticator:
    """A `NodeAuthenticator` for the CA server: the node name of a trusted agent's bound token."""

    client_certificates = False  # the CA's TLS asks for no client certificate in this mode

    def __init__(self, api: KubeApi, *, trusted_agents: Iterable[str] | str = DEFAULT_TRUSTED_AGENTS,
                 audience: str = DEFAULT_AUDIENCE, pods: PodLookup | None = None, cache_ttl: float = 10.0,
                 cache_size: int = 1024, timeout: float = 10.0, workload_tokens: bool = False) -> None:
        self.api = api
        self.trusted = parse_trusted_agents(trusted_agents)
        # Off by default: then only node agents obtain certificates. On, any other service account may obtain
        # its own identity (and only that), as Istio's CA allows; waypoints in a cluster need it.
        self.workload_tokens = workload_tokens
        if not audience:
            raise ValueError("--token-audience must not be empty")
        self.audience = audience
        self.pods = pods
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.timeout = timeout
        self.reviews = 0  # TokenReviews sent (for tests and metrics)
        self._cache: OrderedDict[bytes, tuple[float, ReviewedToken]] = OrderedDict()
        self._locks: dict[bytes, asyncio.Lock] = {}

    async def authenticate(self, request: web.Request) -> str | WorkloadPrincipal:
        reviewed = await self.review(bearer_token(request))
        if (reviewed.namespace, reviewed.service_account) not in self.trusted and self.workload_tokens:
            return WorkloadPrincipal(reviewed.namespace, reviewed.service_account)
        if (reviewed.namespace, reviewed.service_account) not in self.trusted:
            trusted = ", ".join(sorted(f"{n}/{s}" for n, s in self.trusted))
            raise Refusal("not_a_node", f"service account {reviewed.namespace}/{reviewed.service_account} is not a "
                                        f"trusted node agent (trusted: {trusted})")
        return self.node_of(reviewed)

    def node_of(self, reviewed: ReviewedToken) -> str:
        node = reviewed.one(NODE_NAME_EXTRA)
        if node is None:
            node = self._node_from_pod(reviewed)
        try:
            return validate_node_name(node)
        except IdentityError as exc:
            raise Refusal("not_a_node", f"the token's node: {exc}") from None

    def _node_from_pod(self, reviewed: ReviewedToken) -> str:
        pod_name, pod_uid = reviewed.one(POD_NAME_EXTRA), reviewed.one(POD_UID_EXTRA)
        if pod_name is None:
            raise Refusal("not_a_node", "the token is bound to no pod and names no node: use a projected "
                                        "service-account token")
        if self.pods is None:
            raise Refusal("not_a_node", "the token names no node, and this CA has no pod view to find the node "
                                        "of its pod (run it with --placement kube)")
        try:
            pod = self.pods.pod(reviewed.namespace, pod_name)
        except PlacementError as exc:
            raise Refusal("placement_unavailable", f"cannot look up the agent pod: {exc}") from None
        where = f"{reviewed.namespace}/{pod_name}"
        if pod is None:
            raise Refusal("not_a_node", f"the token's pod {where} is not known (deleted, or not seen yet)")
        if pod_uid is not None and pod.uid != pod_uid:
            raise Refusal("not_a_node", f"the token's pod {where} has been re-created (uid {pod.uid}, token for "
                                        f"{pod_uid})")
        if pod.service_account != reviewed.service_account:
            raise Refusal("not_a_node", f"the token's pod {where} runs as {pod.service_account}, not "
                                        f"{reviewed.service_account}")
        if not pod.node:
            raise Refusal("not_a_node", f"the token's pod {where} is not scheduled on a node")
        return pod.node

    def _cached(self, digest: bytes) -> ReviewedToken | None:
        hit = self._cache.get(digest)
        if hit is None or hit[0] <= time.monotonic():
            return None
        self._cache.move_to_end(digest)
        return hit[1]

    async def review(self, token: str) -> ReviewedToken:
        """The TokenReview verdict on `token`; concurrent requests with one token share one review."""
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cached(digest)
        if cached is not None:
            return cached
        lock = self._locks.setdefault(digest, asyncio.Lock())
        try:
            async with lock:
                cached = self._cached(digest)
                return cached if cached is not None else await self._ask(token, digest)
        finally:
            if not lock.locked():
                self._locks.pop(digest, None)

    async def _ask(self, token: str, digest: bytes) -> ReviewedToken:
        now = time.monotonic()
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]}}
        self.reviews += 1
        try:
            doc = await self.api.request("POST", TOKENREVIEW_PATH, body=body, timeout=self.timeout)
        except (TimeoutError, KubeApiError, aiohttp.ClientError, OSError) as exc:
            log.warning("TokenReview failed: %s", exc or type(exc).__name__)
            raise Refusal("auth_unavailable", "cannot check the token with the API server right now") from None
        reviewed = read_review(doc, self.audience)
        if self.cache_ttl > 0:
            self._cache[digest] = (now + self.cache_ttl, reviewed)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return reviewed
