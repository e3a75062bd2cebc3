"""The HTTP face of the test double: the Kubernetes REST paths, list/watch, patches and Status errors.

`ApiServer` is a test double of the Kubernetes API server for the netns lab and the tests (there is no real
API server to be had on a development machine). It is never shipped as a control plane: all state lives in
memory and is gone when it stops, authentication is a fixed token table and every authenticated caller may
do everything. What it does keep is the wire protocol, so that real clients (kubectl, kubernetes-asyncio)
talk to it unchanged: discovery, list with resourceVersion/limit/continue, watch with bookmarks and 410
Gone, create/update/patch/delete with the real Status errors, label and field selectors.

Test hooks a real server does not have: `compact()` (forget history: older resourceVersions get 410),
`drop_watches()` (cut every watch connection), `send_bookmarks()`, `refuse_watches` (answer new watches
with 503), and `store.inject_raw()` / `inject_watch_line()` to plant malformed data.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web

from mesh.kube.apiserver import discovery, kinds, tables
from mesh.kube.apiserver.controllers import install_controllers
from mesh.kube.apiserver.errors import (
    ApiError,
    bad_request,
    expired,
    method_not_allowed,
    service_unavailable,
    too_large_resource_version,
    unauthorized,
)
from mesh.kube.apiserver.kinds import Registry, ResourceType
from mesh.kube.apiserver.patch import APPLY_PATCH, JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH
from mesh.kube.apiserver.selectors import compile_selectors
from mesh.kube.apiserver.store import Store, matches
from mesh.kube.apiserver.watch import Drop, WatchStream, bookmark, encode_event

log = logging.getLogger(__name__)

MAX_BODY = 3 * 1024 * 1024
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, APPLY_PATCH)


@dataclass(frozen=True)
class UserInfo:
    """Who a token belongs to. `extra` is what bound service-account tokens carry (e.g.
    `authentication.kubernetes.io/pod-name`, `.../node-name`); `audiences`, when set, are the only ones
    the token is valid for in a TokenReview that names audiences."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    audiences: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"username": self.username, "uid": self.uid, "groups": list(self.groups)}
        if self.extra:
            out["extra"] = {k: list(v) for k, v in self.extra.items()}
        return out


@dataclass(frozen=True)
class RequestRecord:
    """What a client asked, kept so tests can tell a resumed watch from a fresh list."""

    method: str
    path: str
    query: Mapping[str, str]
    verb: str


@dataclass(frozen=True)
class Target:
    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


@dataclass(eq=False)
class _Watch:
    stream: WatchStream
    request: web.Request
    response: web.StreamResponse | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _not_found_path() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")


def parse_target(registry: Registry, path: str) -> Target | tuple[str, str] | None:
    """A resource URL to its target; `(group, version)` for a group-version discovery URL; None otherwise."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return (group, version)
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        candidate = registry.lookup(group, version, rest[2])
        if candidate is not None and candidate.namespaced:
            namespace, rest = rest[1], rest[2:]
    rtype = registry.lookup(group, version, rest[0])
    if rtype is None or len(rest) > 3:
        raise _not_found_path()
    name = rest[1] if len(rest) >= 2 else None
    sub = rest[2] if len(rest) == 3 else None
    if rtype.namespaced and name is not None and namespace is None:
        raise _not_found_path()
    if sub is not None and sub not in rtype.subresources:
        raise _not_found_path()
    return Target(rtype, namespace, name, sub)


def _encode_continue(rv: int, start: tuple[str, str]) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": list(start)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, tuple[str, str]]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return int(raw["rv"]), (str(raw["start"][0]), str(raw["start"][1]))
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
        raise bad_request("continue key is not valid: the token does not decode") from None


def _parse_rv(value: str | None, what: str = "resourceVersion") -> int | None:
    if value in (None, "", "0"):
        return None
    try:
        rv = int(value)
        if rv < 0:
            raise ValueError
    except ValueError:
        raise bad_request(f'{what}: Invalid value: "{value}": must be a non-negative integer') from None
    return rv


def _wants_table(accept: str) -> bool:
    return "as=Table" in accept and "g=meta.k8s.io" in accept


class ApiServer:
    """A test double of the Kubernetes API server (see the module docstring): `await start()`, `await stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, store: Store | None = None,
                 tokens: Mapping[str, UserInfo | Mapping[str, Any]] | None = None, require_auth: bool = False,
                 ssl_context: ssl.SSLContext | None = None, bookmark_interval: float = 60.0,
                 too_large_wait: float = 3.0, min_request_timeout: float = 1800.0, start_rv: int | None = None,
                 max_events: int = 10000, service_cidr: str = "10.96.0.0/12") -> None:
        self.host = host
        self.port = port
        self.store = store or Store(start_rv=start_rv, max_events=max_events, service_cidr=service_cidr)
        if not self.store.has_controllers:
            install_controllers(self.store)
        self.tokens: dict[str, UserInfo] = {}
        for token, user in (tokens or {}).items():
            self.add_token(token, user)
        self.require_auth = require_auth
        self.ssl_context = ssl_context
        self.bookmark_interval = bookmark_interval
        self.too_large_wait = too_large_wait
        self.min_request_timeout = min_request_timeout
        self.refuse_watches = False
        self.requests: deque[RequestRecord] = deque(maxlen=5000)
        self._watches: set[_Watch] = set()
        self._runner: web.AppRunner | None = None
        self._rv_changed = asyncio.Event()
        self.store.subscribe(lambda _change: self._rv_changed.set())

    # --- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> ApiServer:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that goes away ends its watch at once, not at the next write.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handle_signals=False,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context, reuse_address=True)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("test-double API server listening on %s", self.url)
        return self

    async def stop(self) -> None:
        self.drop_watches(abort=False)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ApiServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- test hooks --------------------------------------------------------------------------------

    def add_token(self, token: str, user: UserInfo | Mapping[str, Any]) -> None:
        if not isinstance(user, UserInfo):
            user = UserInfo(str(user.get("username", "")), str(user.get("uid", "")),
                            tuple(user.get("groups") or ()),
                            {str(k): tuple(v) for k, v in (user.get("extra") or {}).items()},
                            tuple(user.get("audiences") or ()))
        self.tokens[token] = user

    def compact(self) -> None:
        self.store.compact()

    def drop_watches(self, abort: bool = True) -> int:
        """Cut every open watch (reset the connection when `abort`); returns how many were cut."""
        watches = list(self._watches)
        for w in watches:
            w.stream.drop(abort)
        return len(watches)

    def send_bookmarks(self) -> None:
        for w in list(self._watches):
            if w.extra.get("bookmarks"):
                w.stream.put(bookmark(w.stream.rtype, self.store.rv))

    def inject_watch_line(self, line: bytes) -> None:
        """Send raw bytes to every open watch, as a broken server or proxy might."""
        for w in list(self._watches):
            w.stream.put(line)

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    # --- dispatch ----------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        verb = ""
        try:
            self._authenticate(request)
            path = request.path
            static = self._static(path, request)
            if static is not None:
                verb = "discovery"
                return static
            target = parse_target(self.store.registry, path)
            if target is None:
                raise _not_found_path()
            if isinstance(target, tuple):
                verb = "discovery"
                doc = discovery.api_resource_list(self.store.registry, *target)
                if doc is None or request.method != "GET":
                    raise _not_found_path()
                return web.json_response(doc)
            verb = self._verb(request.method, target, query)
            if verb not in target.rtype.verbs and not (target.subresource and verb in ("get", "update", "patch")):
                raise method_not_allowed()
            self.requests.append(RequestRecord(request.method, path, query, verb))
            return await self._dispatch(verb, target, request, query)
        except ApiError as err:
            if verb in ("", "discovery"):
                self.requests.append(RequestRecord(request.method, request.path, query, verb or "unknown"))
            headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
            return web.json_response(err.status(), status=err.code, headers=headers)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("internal error serving %s %s", request.method, request.path)
            return web.json_response(ApiError(500, "InternalError", "an internal error occurred").status(),
                                     status=500)

    def _authenticate(self, request: web.Request) -> UserInfo | None:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        user = self.tokens.get(token) if token else None
        if self.require_auth and user is None:
            raise unauthorized()
        return user

    def _static(self, path: str, request: web.Request) -> web.StreamResponse | None:
        reg = self.store.registry
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if request.method != "GET":
            return None
        if path == "/version":
            return web.json_response(discovery.SERVER_VERSION)
        if path == "/api":
            return web.json_response(discovery.api_versions(f"{self.host}:{self.port}"))
        if path == "/apis":
            return web.json_response(discovery.api_group_list(reg))
        if path == "/":
            paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/openapi/v3", "/readyz", "/version"]
            paths += [f"/apis/{g}" for g in reg.group_versions()]
            paths += [f"/apis/{g}/{v}" for g, vs in reg.group_versions().items() for v in vs]
            return web.json_response({"paths": sorted(paths)})
        if path == "/openapi/v3":
            return web.json_response(discovery.openapi_root(reg))
        if path.startswith("/openapi/v3/"):
            parts = path[len("/openapi/v3/"):].split("/")
            gv = ("", parts[1]) if parts[0] == "api" and len(parts) == 2 else \
                (parts[1], parts[2]) if parts[0] == "apis" and len(parts) == 3 else None
            doc = discovery.openapi_gv_document(reg, *gv) if gv else None
            if doc is None:
                raise _not_found_path()
            return web.json_response(doc)
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] == "apis":
            doc = discovery.api_group(reg, parts[1])
            if doc is None:
                raise _not_found_path()
            return web.json_response(doc)
        return None

    @staticmethod
    def _verb(method: str, target: Target, query: Mapping[str, str]) -> str:
        if method == "GET":
            if target.name is not None:
                return "get"
            return "watch" if query.get("watch", "").lower() in ("true", "1") else "list"
        if method == "POST" and target.name is None:
            return "create"
        if method == "PUT" and target.name is not None:
            return "update"
        if method == "PATCH" and target.name is not None:
            return "patch"
        if method == "DELETE":
            return "delete" if target.name is not None else "deletecollection"
        raise method_not_allowed()

    async def _dispatch(self, verb: str, t: Target, request: web.Request,
                        query: Mapping[str, str]) -> web.StreamResponse:
        store = self.store
        if query.get("dryRun"):
            raise bad_request("dryRun: this test double does not implement dry runs")
        if verb == "get":
            return self._object_response(request, t.rtype, store.get(t.rtype, t.namespace, t.name or ""))
        if verb == "list":
            return await self._list(request, t, query)
        if verb == "watch":
            return await self._watch(request, t, query)
        if verb == "create":
            body = await self._body(request)
            if t.rtype is kinds.TOKENREVIEWS:
                return web.json_response(self._token_review(body), status=201)
            return self._object_response(request, t.rtype, store.create(t.rtype, t.namespace, body), status=201)
        if verb == "update":
            body = await self._body(request)
            return self._object_response(request, t.rtype,
                                         store.update(t.rtype, t.namespace, t.name or "", body, t.subresource))
        if verb == "patch":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            if content_type not in PATCH_TYPES:
                raise ApiError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format - accepted media types include: "
                               f"{', '.join(PATCH_TYPES[:3])}")
            body = await self._body(request, force_json=content_type != APPLY_PATCH)
            return self._object_response(request, t.rtype, store.patch(t.rtype, t.namespace, t.name or "",
                                                                        content_type, body, t.subresource))
        if verb == "delete":
            options = await self._body(request, optional=True) or {}
            pre = options.get("preconditions") or {} if isinstance(options, dict) else {}
            obj = store.delete(t.rtype, t.namespace, t.name or "", pre.get("uid"), pre.get("resourceVersion"))
            return self._object_response(request, t.rtype, obj)
        if verb == "deletecollection":
            labels, fields = self._selectors(t.rtype, query)
            deleted = []
            for obj in store.list(t.rtype, t.namespace, labels, fields):
                meta = obj.get("metadata") or {} if isinstance(obj, dict) else {}
                with contextlib.suppress(ApiError):
                    deleted.append(store.delete(t.rtype, meta.get("namespace"), meta.get("name", "")))
            return web.json_response(self._list_doc(t.rtype, deleted, store.rv, None, None))
        raise method_not_allowed()

    async def _body(self, request: web.Request, optional: bool = False, force_json: bool = False) -> Any:
        raw = await request.read()
        if not raw.strip():
            if optional:
                return None
            raise bad_request("the request has no body")
        content_type = request.headers.get("Content-Type", "application/json")
        try:
            if "yaml" in content_type and not force_json:
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as err:
            raise bad_request(f"the request body does not decode: {err}") from None

    def _object_response(self, request: web.Request, rtype: ResourceType, obj: Any,
                         status: int = 200) -> web.Response:
        if _wants_table(request.headers.get("Accept", "")):
            doc = tables.table(rtype, [obj], str(self.store.rv), request.query.get("includeObject", "Metadata"))
            return web.json_response(doc, status=status)
        return web.json_response(obj, status=status)

    def _selectors(self, rtype: ResourceType, query: Mapping[str, str]) -> tuple[Any, Any]:
        allowed = {"metadata.name", "metadata.namespace", *rtype.field_labels}
        return compile_selectors(query.get("labelSelector"), query.get("fieldSelector"), allowed.__contains__)

    def _list_doc(self, rtype: ResourceType, items: list[Any], rv: int, token: str | None,
                  remaining: int | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if token:
            meta["continue"] = token
            if remaining is not None:
                meta["remainingItemCount"] = remaining
        return {"kind": f"{rtype.kind}List", "apiVersion": rtype.group_version, "metadata": meta, "items": items}

    async def _wait_for_rv(self, rv: int) -> None:
        deadline = time.monotonic() + self.too_large_wait
        while self.store.rv < rv:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise too_large_resource_version(rv, self.store.rv)
            self._rv_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rv_changed.wait(), min(remaining, 0.25))

    async def _list(self, request: web.Request, t: Target, query: Mapping[str, str]) -> web.Response:
        labels, fields = self._selectors(t.rtype, query)
        rv_text, match = query.get("resourceVersion"), query.get("resourceVersionMatch")
        token = query.get("continue")
        try:
            limit = int(query.get("limit", "0") or 0)
        except ValueError:
            raise bad_request(f"limit: Invalid value: {query.get('limit')!r}: must be an integer") from None
        start: tuple[str, str] | None = None
        if match and rv_text in (None, ""):
            raise bad_request("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless "
                              "resourceVersion is provided")
        if match not in (None, "", "Exact", "NotOlderThan"):
            raise bad_request(f'resourceVersionMatch: Unsupported value: "{match}": supported values: "Exact", '
                              '"NotOlderThan"')
        if token:
            if rv_text not in (None, ""):
                raise bad_request("specifying resource version is not allowed when using continue")
            at, start = _decode_continue(token)
            if at < self.store.compacted_rv:
                raise expired("The provided continue parameter is too old to display a consistent list result. "
                              "Start a new list without the continue parameter.")
        else:
            asked = _parse_rv(rv_text)
            if match == "Exact" and rv_text == "0":
                raise bad_request('resourceVersionMatch "Exact" is forbidden for resourceVersion "0"')
            if asked is not None and asked > self.store.rv:
                await self._wait_for_rv(asked)
            at = asked if (match == "Exact" and asked is not None) else self.store.rv
        snapshot = self.store.snapshot(t.rtype, at)
        keys = [k for k in sorted(snapshot) if (t.namespace is None or k[0] == t.namespace)
                and (start is None or k > start)]
        selected = [(k, snapshot[k]) for k in keys if matches(snapshot[k], labels, fields)]
        next_token, remaining = None, None
        if limit > 0 and len(selected) > limit:
            next_token = _encode_continue(at, selected[limit - 1][0])
            remaining = len(selected) - limit if labels.empty and fields.empty else None
            selected = selected[:limit]
        items = [obj for _, obj in selected]
        if _wants_table(request.headers.get("Accept", "")):
            return web.json_response(tables.table(t.rtype, items, str(at), query.get("includeObject", "Metadata"),
                                                  next_token))
        return web.json_response(self._list_doc(t.rtype, items, at, next_token, remaining))

    async def _watch(self, request: web.Request, t: Target, query: Mapping[str, str]) -> web.StreamResponse:
        if self.refuse_watches:
            raise service_unavailable("watches are refused for now (test hook)")
        labels, fields = self._selectors(t.rtype, query)
        asked = _parse_rv(query.get("resourceVersion"))
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        initial_events = query.get("sendInitialEvents", "").lower() in ("true", "1")
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else \
                self.min_request_timeout * random.uniform(1.0, 2.0)
        except ValueError:
            raise bad_request(f"timeoutSeconds: Invalid value: {query.get('timeoutSeconds')!r}") from None
        table = _wants_table(request.headers.get("Accept", ""))
        include = query.get("includeObject", "Metadata")

        def render(event: str, obj: Any) -> bytes:
            return encode_event(event, tables.table(t.rtype, [obj], str(self.store.rv), include))

        stream = WatchStream(t.rtype, t.namespace, labels, fields, render if table else None)
        if asked is not None and asked > self.store.rv:
            await self._wait_for_rv(asked)
        gone: ApiError | None = None
        initial: list[bytes] = []
        if asked is None:
            for key, obj in sorted(self.store.snapshot(t.rtype).items()):
                if stream.selects(key, obj):
                    initial.append(render("ADDED", obj) if table else encode_event("ADDED", obj))
            if initial_events and bookmarks:
                initial.append(bookmark(t.rtype, self.store.rv, initial_events_end=True))
        else:
            try:
                for change in self.store.changes_since(asked):
                    event = stream.event_for(change)
                    if event is not None:
                        initial.append(stream.line(event, change))
            except ApiError as err:
                gone = err
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if gone is not None:
            await response.write(encode_event("ERROR", gone.status()))
            await response.write_eof()
            return response
        watch = _Watch(stream, request, response, {"bookmarks": bookmarks})
        unsubscribe = self.store.subscribe(stream.offer)
        self._watches.add(watch)
        try:
            for line in initial:
                await response.write(line)
            await self._pump(watch, timeout, bookmarks)
        except ConnectionError:
            pass
        except Exception:  # the status line is sent: report in-band, as the real server does mid-stream
            log.exception("internal error in a watch of %s", t.rtype.plural)
            with contextlib.suppress(ConnectionError):
                await response.write(encode_event("ERROR", ApiError(500, "InternalError",
                                                                    "an internal error occurred").status()))
                await response.write_eof()
        finally:
            unsubscribe()
            self._watches.discard(watch)
            stream.closed = True
        return response

    async def _pump(self, watch: _Watch, timeout: float, bookmarks: bool) -> None:
        response = watch.response
        assert response is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = loop.time() + self.bookmark_interval
        while True:
            now = loop.time()
            if now >= deadline:
                await response.write_eof()
                return
            wait = min(deadline, next_bookmark) - now if bookmarks else deadline - now
            try:
                item = await asyncio.wait_for(watch.stream.queue.get(), max(wait, 0.001))
            except TimeoutError:
                if bookmarks and loop.time() >= next_bookmark:
                    await response.write(bookmark(watch.stream.rtype, self.store.rv))
                    next_bookmark = loop.time() + self.bookmark_interval
                continue
            if isinstance(item, Drop):
                transport = watch.request.transport
                if item.abort and transport is not None:
                    transport.abort()
                    return
                await response.write_eof()
                return
            await response.write(item)

    def _token_review(self, body: Any) -> dict[str, Any]:
        spec = body.get("spec") if isinstance(body, dict) else None
        token = spec.get("token") if isinstance(spec, dict) else None
        if not isinstance(token, str) or not token:
            raise ApiError(422, "Invalid", 'TokenReview.authentication.k8s.io "" is invalid: spec.token: '
                                           "Required value: token must not be empty")
        user = self.tokens.get(token)
        audiences = spec.get("audiences") if isinstance(spec, dict) else None
        error = "invalid bearer token"
        if user is not None and audiences and user.audiences:
            audiences = [a for a in audiences if a in user.audiences]
            if not audiences:  # as the real authenticator: a token for other audiences is not authenticated
                user, error = None, "token audiences are invalid for the target audiences"
        status: dict[str, Any] = {"authenticated": user is not None, "user": user.to_json() if user else {}}
        if user is not None and audiences:
            status["audiences"] = audiences
        if user is None:
            status["error"] = error
        return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": {k: v for k, v in spec.items() if k != "token"}
                if isinstance(spec, dict) else {}, "status": status}
