"""The CA: its directory, strict signing, the mutual-TLS signing API, placement checks, metrics, CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mesh.ca import CAError, CertificateAuthority, NodeCredentials
from mesh.ca.cli import register
from mesh.ca.client import CAClient, CADenied, CAUnavailable
from mesh.ca.placement import (
    FilePlacement,
    LabPlacement,
    MemoryPlacement,
    PlacementError,
    placement_from_spec,
)
from mesh.ca.server import CAServer
from mesh.identity import IdentityError, SpiffeId, build_csr, generate_private_key, verify_peer_chain

TD = "cluster.local"
SLEEP = SpiffeId(TD, "default", "sleep")
HTTPBIN = SpiffeId(TD, "default", "httpbin")
OTHER = SpiffeId(TD, "prod", "billing")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture
def placement() -> MemoryPlacement:
    return MemoryPlacement({"node-a": [SLEEP], "node-b": [HTTPBIN]})


@pytest.fixture
async def server(ca, placement):
    srv = CAServer(ca, placement)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.stop()


def _url(srv: CAServer) -> str:
    return f"https://127.0.0.1:{srv.port}"


@pytest.fixture
async def client_a(ca, server):
    async with CAClient(_url(server), ca.issue_node("node-a")) as client:
        yield client


def _csr(names, key=None) -> bytes:
    key = key or generate_private_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# ---- the CA core -------------------------------------------------------------------------------------


def test_sign_csr_returns_leaf_first_chain_with_default_ttl(ca):
    key = generate_private_key()
    chain = ca.sign_csr(build_csr(SLEEP, key))
    assert [c.subject for c in chain[1:]] == [ca.intermediate_cert.subject]
    leaf = chain[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=24)
    assert verify_peer_chain([leaf], ca.bundle, TD) == SLEEP
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku and x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()


def test_ttl_down_to_seconds_and_bad_ttl_refused(ca):
    wc = ca.issue_workload(SLEEP, ttl=3)
    assert wc.lifetime == timedelta(seconds=3)
    for bad in (0, -5, timedelta(milliseconds=10), "10"):
        with pytest.raises(CAError) as err:
            ca.issue_workload(SLEEP, ttl=bad)
        assert err.value.code == "bad_ttl"


def test_ca_refuses_identity_outside_its_trust_domain(ca):
    with pytest.raises(CAError) as err:
        ca.issue_workload(SpiffeId("other.example", "default", "sleep"))
    assert err.value.code == "foreign_trust_domain"


def test_init_dir_writes_private_keys_and_load_works_with_root_key_offline(tmp_path):
    d = tmp_path / "ca"
    created = CertificateAuthority.init_dir(d, "example.org")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for key_file in ("root-key.pem", "ca-key.pem"):
        assert stat.S_IMODE(os.stat(d / key_file).st_mode) == 0o600
    (d / "root-key.pem").unlink()  # "moved offline"
    loaded = CertificateAuthority.load(d)
    assert loaded.trust_domain == "example.org" and loaded.root_key is None
    assert loaded.root_cert == created.root_cert
    wc = loaded.issue_workload(SpiffeId("example.org", "default", "sleep"))
    assert verify_peer_chain([wc.leaf], created.bundle, "example.org").service_account == "sleep"


def test_init_dir_refuses_to_overwrite_and_load_refuses_bad_dirs(tmp_path):
    d = tmp_path / "ca"
    CertificateAuthority.init_dir(d)
    with pytest.raises(CAError, match="refusing to overwrite"):
        CertificateAuthority.init_dir(d)
    os.chmod(d / "ca-key.pem", 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        CertificateAuthority.load(d)
    os.chmod(d / "ca-key.pem", 0o600)
    (d / "ca-cert.pem").unlink()
    with pytest.raises(CAError, match=r"ca-cert\.pem is missing"):
        CertificateAuthority.load(d)
    with pytest.raises(CAError, match="does not exist"):
        CertificateAuthority.load(tmp_path / "nothing")


# ---- placement sources ------------------------------------------------------------------------------


def test_file_placement_nodes_map_is_reread_when_changed(tmp_path):
    path = tmp_path / "placement.yaml"
    path.write_text(json.dumps({"nodes": {"node-a": [str(SLEEP)]}}))
    source = FilePlacement(path)
    assert source.identities_on_node("node-a") == {SLEEP}
    assert source.identities_on_node("node-b") == set()
    path.write_text(json.dumps({"nodes": {"node-a": [str(SLEEP), str(OTHER)], "node-b": [str(HTTPBIN)]}}))
    assert source.identities_on_node("node-a") == {SLEEP, OTHER}
    assert source.identities_on_node("node-b") == {HTTPBIN}


def test_file_placement_reads_ztunnel_local_config_workloads(tmp_path):
    path = tmp_path / "local.yaml"
    path.write_text(
        "workloads:\n"
        "- {uid: c//v1/Pod/default/sleep, name: sleep, namespace: default, serviceAccount: sleep,"
        " workloadIps: [10.244.1.2], node: node-a}\n"
        "- {uid: c//v1/Pod/prod/billing, name: billing, namespace: prod, serviceAccount: billing,"
        " workloadIps: [10.244.2.2], node: node-b, trustDomain: other.example}\n"
        "- {uid: c//v1/Pod/default/vm, name: vm, namespace: default, serviceAccount: vm, workloadIps: [10.0.0.9]}\n"
    )
    source = FilePlacement(path)
    assert source.identities_on_node("node-a") == {SLEEP}
    assert source.identities_on_node("node-b") == {SpiffeId("other.example", "prod", "billing")}


@pytest.mark.parametrize(
    "content, words",
    [
        ("nodes: [1, 2]", "'nodes' must map"),
        ("nodes: {node-a: [spiffe://cluster.local/ns/default]}", "nodes.node-a[0]"),
        ("pods: []", "expected a mapping with 'nodes'"),
        ("nodes: {node-a: [", "not valid YAML"),
        ("workloads: [{name: x}]", "workloads"),
    ],
)
def test_file_placement_bad_content_is_a_clear_placement_error(tmp_path, content, words):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(PlacementError) as err:
        FilePlacement(path).identities_on_node("node-a")
    assert words in str(err.value)


def test_lab_placement_from_state_file(tmp_path):
    state = {
        "name": "x", "trustDomain": "cluster.local",
        "nodes": [{"name": "node-a"}, {"name": "node-b"}],
        "pods": [
            {"name": "client", "namespace": "default", "serviceAccount": "sleep", "node": "node-a"},
            {"name": "server", "namespace": "default", "serviceAccount": "httpbin", "node": "node-b"},
        ],
    }
    path = tmp_path / "x.json"
    path.write_text(json.dumps(state))
    source = LabPlacement(path=path)
    assert source.identities_on_node("node-a") == {SLEEP}
    assert source.identities_on_node("node-b") == {HTTPBIN}
    path.unlink()
    with pytest.raises(PlacementError, match="does not exist"):
        source.identities_on_node("node-a")


def test_placement_spec_parsing(tmp_path):
    assert isinstance(placement_from_spec(f"file:{tmp_path}/p.yaml"), FilePlacement)
    assert placement_from_spec("lab:demo").describe() == "lab:demo"
    for bad in ("", "lab", "k8s:x", "file:"):
        with pytest.raises(PlacementError):
            placement_from_spec(bad)


@pytest.mark.root
def test_lab_placement_sees_the_pods_of_a_real_lab(make_lab):
    lab = make_lab()
    source = LabPlacement(lab.name)
    assert source.identities_on_node("node-a") == {SLEEP}
    assert source.identities_on_node("node-b") == {HTTPBIN}


# ---- the signing API -----------------------------------------------------------------------------------


async def test_node_gets_certificate_for_its_pod_leaf_first_with_bundle(ca, server, client_a):
    signed = await client_a.sign_csr(build_csr(SLEEP, generate_private_key()))
    assert len(signed.chain) == 2 and signed.chain[1] == ca.intermediate_cert
    assert signed.roots.roots == (ca.root_cert,)
    wc = await client_a.fetch(SLEEP)
    assert wc.identity == SLEEP and wc.lifetime == timedelta(hours=24)
    assert verify_peer_chain([wc.leaf], wc.roots, TD) == SLEEP
    assert server.metrics.issued_count() == 2 and server.metrics.denied_count() == 0


async def test_node_denied_identity_without_pod_on_it(ca, server, client_a, caplog):
    caplog.set_level(logging.WARNING, logger="nodemesh.ca")
    with pytest.raises(CADenied) as err:
        await client_a.fetch(HTTPBIN)  # runs on node-b, not node-a
    assert err.value.status == 403 and err.value.code == "not_on_node"
    assert "node 'node-a' has no pod with identity spiffe://cluster.local/ns/default/sa/httpbin" in str(err.value)
    assert server.metrics.issued_count() == 0
    assert server.metrics.denied_count("not_on_node") == 1
    assert any("not_on_node" in r.getMessage() and "node-a" in r.getMessage() for r in caplog.records)


async def test_placement_changes_are_seen_without_restart(ca, server, client_a, placement):
    with pytest.raises(CADenied):
        await client_a.fetch(OTHER)
    placement.add("node-a", OTHER)
    assert (await client_a.fetch(OTHER)).identity == OTHER
    placement.remove("node-a", SLEEP)
    with pytest.raises(CADenied) as err:
        await client_a.fetch(SLEEP)
    assert err.value.code == "not_on_node"


@pytest.mark.parametrize(
    "csr, status, code",
    [
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nbm9wZQ==\n-----END CERTIFICATE REQUEST-----\n", 400,
         "malformed_csr"),
        (lambda: b"not a csr at all", 400, "malformed_csr"),
        (lambda: _csr([x509.UniformResourceIdentifier(str(SLEEP)), x509.UniformResourceIdentifier(str(OTHER))]),
         400, "san_count"),
        (lambda: _csr([x509.UniformResourceIdentifier("spiffe://evil.example/ns/default/sa/sleep")]), 403,
         "foreign_trust_domain"),
        (lambda: _csr([x509.DNSName("sleep.default.svc.cluster.local")]), 400, "not_uri_san"),
    ],
)
async def test_bad_csrs_refused_with_their_own_error_and_ca_keeps_serving(ca, server, client_a, csr, status, code):
    with pytest.raises(CADenied) as err:
        await client_a.sign_csr(csr())
    assert (err.value.status, err.value.code) == (status, code), str(err.value)
    assert server.metrics.denied_count(code) == 1 and server.metrics.issued_count() == 0
    assert (await client_a.fetch(SLEEP)).identity == SLEEP


async def _raw_post(url: str, ctx: ssl.SSLContext, body: bytes | dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        kwargs = {"json": body} if isinstance(body, dict) else {"data": body}
        async with session.post(url + "/v1/certificates", ssl=ctx, server_hostname="nodemesh-ca", **kwargs) as r:
            return r.status, await r.json(content_type=None)


def _client_ctx(ca, creds=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.bundle.roots_pem().decode())
    if creds is not None:
        creds.load_into(ctx, verify=False)
    return ctx


async def test_request_body_errors_name_the_field(ca, server):
    ctx = _client_ctx(ca, ca.issue_node("node-a"))
    status, body = await _raw_post(_url(server), ctx, b"{not json")
    assert status == 400 and body["error"] == "bad_request" and "not JSON" in body["message"]
    status, body = await _raw_post(_url(server), ctx, {"csr": "x", "ttlSecs": 5})
    assert status == 400 and "ttlSecs" in body["message"]
    status, body = await _raw_post(_url(server), ctx, {"csr": "x", "ttlSeconds": -1})
    assert status == 400 and "ttlSeconds" in body["message"]
    status, body = await _raw_post(_url(server), ctx, {})
    assert status == 400 and "csr" in body["message"]
    status, body = await _raw_post(_url(server), ctx, {"csr": "A" * 200_000})
    assert status == 400 and "larger than" in body["message"]
    assert server.metrics.issued_count() == 0 and server.metrics.denied_count("bad_request") == 5


async def test_unauthenticated_client_refused_and_ca_keeps_serving(ca, server, client_a):
    status, body = await _raw_post(_url(server), _client_ctx(ca), {"csr": build_csr(SLEEP, generate_private_key())
                                                                  .decode()})
    assert status == 401 and body["error"] == "unauthenticated"
    assert "no client certificate" in body["message"]
    assert server.metrics.denied_count("unauthenticated") == 1 and server.metrics.issued_count() == 0
    assert (await client_a.fetch(SLEEP)).identity == SLEEP


async def test_expired_node_certificate_refused_with_its_own_error(ca, server, client_a):
    expired = ca.issue_node("node-a", ttl=60, now=datetime.now(UTC) - timedelta(hours=2))
    async with CAClient(_url(server), expired) as stale:
        with pytest.raises(CADenied) as err:
            await stale.fetch(SLEEP)
    assert err.value.status == 401 and err.value.code == "node_cert_expired"
    assert "expired" in str(err.value)
    assert server.metrics.issued_count() == 0
    assert (await client_a.fetch(SLEEP)).identity == SLEEP


async def test_workload_certificate_cannot_act_as_a_node(ca, server):
    status, body = await _raw_post(_url(server), _client_ctx(ca, ca.issue_workload(SLEEP)),
                                   {"csr": build_csr(SLEEP, generate_private_key()).decode()})
    assert status == 403 and body["error"] == "not_a_node"


async def test_node_certificate_from_another_ca_fails_the_handshake(ca, server, client_a):
    foreign = CertificateAuthority.create(TD).issue_node("node-a")
    ctx = _client_ctx(ca, foreign)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, OSError)):
        await _raw_post(_url(server), ctx, {"csr": "x"})
    assert server.metrics.issued_count() == 0
    assert (await client_a.fetch(SLEEP)).identity == SLEEP


async def test_client_refuses_a_server_that_is_not_the_ca(ca, server):
    # A CA of the same name but other keys: our node's roots do not trust its serving certificate.
    impostor = CAServer(CertificateAuthority.create(TD), MemoryPlacement({"node-a": [SLEEP]}))
    await impostor.start()
    try:
        async with CAClient(_url(impostor), ca.issue_node("node-a")) as client:
            with pytest.raises((CADenied, CAUnavailable)):
                await client.fetch(SLEEP)
    finally:
        await impostor.stop()


async def test_requested_ttl_is_honoured_but_capped_by_the_server(ca, placement):
    srv = CAServer(ca, placement, ttl=3600)
    await srv.start()
    try:
        async with CAClient(_url(srv), ca.issue_node("node-a")) as client:
            assert (await client.fetch(SLEEP, ttl=timedelta(seconds=5))).lifetime == timedelta(seconds=5)
            assert (await client.fetch(SLEEP, ttl=timedelta(days=3))).lifetime == timedelta(hours=1)
    finally:
        await srv.stop()


async def test_unreadable_placement_fails_closed(ca, tmp_path):
    path = tmp_path / "placement.json"
    path.write_text(json.dumps({"nodes": {"node-a": [str(SLEEP)]}}))
    srv = CAServer(ca, FilePlacement(path))
    await srv.start()
    try:
        async with CAClient(_url(srv), ca.issue_node("node-a")) as client:
            assert (await client.fetch(SLEEP)).identity == SLEEP
            path.write_text("{broken")
            with pytest.raises(CAUnavailable) as err:
                await client.fetch(SLEEP)
            assert err.value.status == 503 and err.value.code == "placement_unavailable"
            assert srv.metrics.issued_count() == 1
    finally:
        await srv.stop()


async def test_trust_bundle_endpoint_and_metrics_endpoint(ca, server, client_a):
    bundle = await client_a.trust_bundle()
    assert bundle.roots == (ca.root_cert,) and bundle.intermediates == (ca.intermediate_cert,)
    await client_a.fetch(SLEEP)
    with pytest.raises(CADenied):
        await client_a.fetch(HTTPBIN)
    port = await server.start_metrics("127.0.0.1", 0)
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    assert 'nodemesh_ca_certificates_issued_total{node="node-a"} 1.0' in text
    assert 'nodemesh_ca_certificates_denied_total{reason="not_on_node"} 1.0' in text


async def test_burst_of_100_concurrent_requests_all_served(ca):
    ids = [SpiffeId(TD, "burst", f"sa-{i}") for i in range(100)]
    srv = CAServer(ca, MemoryPlacement({"node-a": ids}))
    await srv.start()
    try:
        async with CAClient(_url(srv), ca.issue_node("node-a"), timeout=60) as client:
            certs = await asyncio.gather(*(client.fetch(i) for i in ids))
        assert [c.identity for c in certs] == ids
        assert srv.metrics.issued_count() == 100
    finally:
        await srv.stop()


# ---- CLI ------------------------------------------------------------------------------------------------


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesh.ca.cli", *argv], capture_output=True, text=True, timeout=60)


def test_register_adds_the_ca_group():
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ca", "serve", "--ca-dir", "d", "--listen", "127.0.0.1:0", "--placement", "lab:x",
                              "--ttl", "5", "--metrics-listen", "127.0.0.1:0"])
    assert args.ttl == 5 and args.metrics == "127.0.0.1:0" and callable(args.func)


def test_cli_bad_input_gives_one_clear_line(tmp_path):
    result = _run_cli("ca", "init", str(tmp_path / "ca"), "--trust-domain", "Bad Domain")
    assert result.returncode == 2 and "trust domain" in result.stderr and "Traceback" not in result.stderr
    result = _run_cli("ca", "issue-node", "node-a", "--ca-dir", str(tmp_path / "missing"), "--out", str(tmp_path))
    assert result.returncode == 2 and "does not exist" in result.stderr


async def test_cli_init_issue_node_serve_and_request(tmp_path):
    ca_dir, node_dir = tmp_path / "ca", tmp_path / "node-a"
    assert _run_cli("ca", "init", str(ca_dir), "--trust-domain", "example.org").returncode == 0
    assert _run_cli("ca", "issue-node", "node-a", "--ca-dir", str(ca_dir), "--out", str(node_dir)).returncode == 0
    assert stat.S_IMODE(os.stat(node_dir / "key.pem").st_mode) == 0o600
    placement = tmp_path / "placement.yaml"
    placement.write_text("nodes:\n  node-a: [spiffe://example.org/ns/default/sa/sleep]\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.ca.cli", "ca", "serve", "--ca-dir", str(ca_dir), "--listen", "127.0.0.1:0",
        "--placement", f"file:{placement}", "--ttl", "30",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "serving on https://127.0.0.1:" in line, line
        url = line.split("serving on ")[1].split()[0]
        creds = NodeCredentials.read_files(node_dir)
        assert creds.node == "node-a"
        async with CAClient(url, creds) as client:
            wc = await client.fetch(SpiffeId("example.org", "default", "sleep"))
            assert wc.lifetime == timedelta(seconds=30)
            with pytest.raises(CADenied):
                await client.fetch(SpiffeId("example.org", "default", "other"))
        out = await asyncio.to_thread(
            _run_cli, "ca", "request", "spiffe://example.org/ns/default/sa/sleep", "--ca-url", url,
            "--node-creds", str(node_dir), "--out", str(tmp_path / "wl"))
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "wl" / "cert-chain.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "not_on_node" in err.decode()
    assert Path(ca_dir / "ca-key.pem").exists()
