"""Response flags and local replies as access logs and gRPC clients see them."""

from __future__ import annotations

import pytest

from waypoint.flags import (
    LocalReply,
    ResponseFlag,
    no_healthy_upstream,
    no_route,
    overflow,
    rbac_denied,
    render_flags,
    upstream_timeout,
)


def test_flags_render_in_envoys_order_and_dash_for_none():
    assert render_flags([]) == "-"
    assert render_flags([ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED, ResponseFlag.UPSTREAM_OVERFLOW]) == "UO,URX"
    assert render_flags([ResponseFlag.FAULT_INJECTED, ResponseFlag.DELAY_INJECTED, ResponseFlag.FAULT_INJECTED]) == \
        "DI,FI"


@pytest.mark.parametrize(
    ("reply", "status", "flag", "body"),
    [
        (no_route(), 404, "NR", b""),
        (no_healthy_upstream(), 503, "UH", b"no healthy upstream"),
        (upstream_timeout(), 504, "UT", b"upstream request timeout"),
        (overflow(), 503, "UO", b"upstream connect error or disconnect/reset before headers. reset reason: overflow"),
        (rbac_denied("ns[a]-policy[b]-rule[0]"), 403, "-", b"RBAC: access denied"),
    ],
)
def test_canonical_local_replies(reply: LocalReply, status, flag, body):
    assert reply.status == status and reply.flag_text == flag and reply.body == body


@pytest.mark.parametrize(
    ("status", "grpc"), [(403, "7"), (404, "12"), (503, "14"), (504, "14"), (429, "14"), (401, "16"), (500, "2")]
)
def test_grpc_clients_get_trailers_only_with_mapped_status(status, grpc):
    headers = dict(LocalReply(status, b"no way: 100%").grpc_headers())
    assert headers[":status"] == "200" and headers["content-type"] == "application/grpc"
    assert headers["grpc-status"] == grpc and headers["grpc-message"] == "no way: 100%25"


def test_plain_reply_headers_carry_text_plain_only_with_a_body():
    assert ("content-type", "text/plain") in overflow().response_headers()
    assert ("x-envoy-overloaded", "true") in overflow().response_headers()
    assert no_route().response_headers() == []
