"""Identity layer: strict SPIFFE IDs, CSRs, credentials files, peer-chain verification, real TLS."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import stat
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from mesh.ca import CertificateAuthority
from mesh.identity import (
    IdentityError,
    SpiffeId,
    TrustBundle,
    WorkloadCert,
    build_csr,
    check_csr,
    generate_private_key,
    mtls_client_context,
    mtls_server_context,
    verify_peer_chain,
)

TD = "cluster.local"
SLEEP = SpiffeId(TD, "default", "sleep")
HTTPBIN = SpiffeId(TD, "default", "httpbin")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    return CertificateAuthority.create("other.example")


# ---- SPIFFE IDs ---------------------------------------------------------------------------------------


def test_spiffe_id_round_trips_and_exposes_parts():
    sid = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
    assert sid == SLEEP
    assert (sid.trust_domain, sid.namespace, sid.service_account) == ("cluster.local", "default", "sleep")
    assert str(sid) == "spiffe://cluster.local/ns/default/sa/sleep"
    assert SpiffeId.parse(str(sid)) == sid
    assert {sid, SpiffeId.parse(str(sid))} == {sid}  # hashable, usable as a dict key


@pytest.mark.parametrize(
    "uri, words",
    [
        ("spiffe://cluster.local/ns/default/sa/sleep/extra", "exactly /ns/"),
        ("spiffe://cluster.local/ns/default/sa", "exactly /ns/"),
        ("spiffe://cluster.local/ns/default", "exactly /ns/"),
        ("spiffe://cluster.local", "no path"),
        ("spiffe://cluster.local/", "no path"),
        ("spiffe://cluster.local/sa/sleep/ns/default", "exactly /ns/"),
        ("spiffe://cluster.local/ns/default/sa/sleep/", "exactly /ns/"),
        ("spiffe://cluster.local/ns//sa/sleep", "namespace"),
        ("spiffe://cluster.local/ns/Default/sa/sleep", "namespace"),
        ("spiffe://cluster.local/ns/default/sa/sl_eep", "service account"),
        ("spiffe://cluster.local/ns/../sa/sleep", "namespace"),
        ("spiffe://cluster.local/ns/default/sa/sleep?x=1", "query"),
        ("spiffe://cluster.local/ns/default/sa/sleep#frag", "fragment"),
        ("spiffe://cluster.local/ns/def%61ult/sa/sleep", "percent"),
        ("spiffe://Cluster.Local/ns/default/sa/sleep", "trust domain"),
        ("spiffe://cluster.local:8080/ns/default/sa/sleep", "trust domain"),
        ("spiffe://user@cluster.local/ns/default/sa/sleep", "trust domain"),
        ("spiffe://cluster..local/ns/default/sa/sleep", "trust domain"),
        ("spiffe:///ns/default/sa/sleep", "no trust domain"),
        ("SPIFFE://cluster.local/ns/default/sa/sleep", "does not start"),
        ("https://cluster.local/ns/default/sa/sleep", "does not start"),
        ("", "empty"),
    ],
)
def test_spiffe_id_parse_rejects_with_reason(uri, words):
    with pytest.raises(IdentityError) as err:
        SpiffeId.parse(uri)
    assert words in str(err.value)
    assert err.value.code == "bad_spiffe_id"


def test_spiffe_id_constructor_validates_fields():
    with pytest.raises(IdentityError, match="trust_domain"):
        SpiffeId("", "default", "sleep")
    with pytest.raises(IdentityError, match="namespace"):
        SpiffeId(TD, "a/b", "sleep")
    with pytest.raises(IdentityError, match="service_account"):
        SpiffeId(TD, "default", "x" * 254)
    with pytest.raises(IdentityError, match="must be a string"):
        SpiffeId.parse(42)


_label = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z")


@given(td=st.lists(_label, min_size=1, max_size=3).map(".".join), ns=_label,
       sa=st.lists(_label, min_size=1, max_size=3).map(".".join))
def test_spiffe_id_format_parse_round_trip(td, ns, sa):
    sid = SpiffeId(td, ns, sa)
    assert SpiffeId.parse(str(sid)) == sid


# ---- CSRs ------------------------------------------------------------------------------------------


def _csr_with_sans(names, key=None, ca_bit=False):
    key = key or generate_private_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    if ca_bit:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_csr_round_trip_gives_identity_and_key():
    key = generate_private_key()
    info = check_csr(build_csr(SLEEP, key), TD)
    assert info.identity == SLEEP
    assert info.public_key.public_numbers() == key.public_key().public_numbers()


@pytest.mark.parametrize(
    "make, code",
    [
        (lambda: b"", "malformed_csr"),
        (lambda: b"hello", "malformed_csr"),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "malformed_csr"),
        (lambda: _csr_with_sans([x509.UniformResourceIdentifier(str(SLEEP)),
                                 x509.UniformResourceIdentifier(str(HTTPBIN))]), "san_count"),
        (lambda: _csr_with_sans([x509.UniformResourceIdentifier(str(SLEEP)), x509.DNSName("sleep")]), "san_count"),
        (lambda: _csr_with_sans([x509.DNSName("sleep.default.svc")]), "not_uri_san"),
        (lambda: _csr_with_sans(None), "no_san"),
        (lambda: _csr_with_sans([x509.UniformResourceIdentifier("spiffe://evil.example/ns/default/sa/sleep")]),
         "foreign_trust_domain"),
        (lambda: _csr_with_sans([x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default")]),
         "bad_spiffe_id"),
        (lambda: _csr_with_sans([x509.UniformResourceIdentifier(str(SLEEP))], ca_bit=True), "ca_requested"),
        (lambda: _csr_with_sans([x509.UniformResourceIdentifier(str(SLEEP))],
                                key=rsa.generate_private_key(65537, 1024)), "unsupported_key"),
        (lambda: _csr_with_sans([x509.UniformResourceIdentifier(str(SLEEP))],
                                key=ec.generate_private_key(ec.SECP256K1())), "unsupported_key"),
    ],
)
def test_csr_check_refuses_each_bad_shape_with_its_own_code(make, code):
    with pytest.raises(IdentityError) as err:
        check_csr(make(), TD)
    assert err.value.code == code, str(err.value)


def test_csr_with_tampered_signature_is_refused():
    pem = build_csr(SLEEP, generate_private_key())
    csr = x509.load_pem_x509_csr(pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    tampered = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der))
                + b"-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(IdentityError) as err:
        check_csr(tampered, TD)
    assert err.value.code in {"bad_csr_signature", "malformed_csr"}


# ---- peer chain verification ------------------------------------------------------------------------------


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_verify_accepts_leaf_alone_as_der_and_full_chain(ca):
    wc = ca.issue_workload(SLEEP)
    assert verify_peer_chain([_der(wc.leaf)], ca.bundle, TD) == SLEEP
    assert verify_peer_chain(wc.chain, ca.bundle, TD) == SLEEP
    # A bundle that knows only the root still verifies when the peer sends its intermediate.
    roots_only = TrustBundle((ca.root_cert,))
    assert verify_peer_chain([_der(c) for c in wc.chain], roots_only, TD) == SLEEP
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([wc.leaf], roots_only, TD)
    assert err.value.code == "unknown_issuer"


def test_verify_rejects_wrong_trust_domain(ca, other_ca):
    foreign = other_ca.issue_workload(SpiffeId("other.example", "default", "sleep"))
    both = ca.bundle.merge(other_ca.bundle)
    assert verify_peer_chain([foreign.leaf], both, "other.example").trust_domain == "other.example"
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([foreign.leaf], both, TD)
    assert err.value.code == "trust_domain"
    assert "other.example" in str(err.value)


def test_verify_rejects_expired_and_not_yet_valid(ca):
    wc = ca.issue_workload(SLEEP, ttl=timedelta(hours=1))
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([wc.leaf], ca.bundle, TD, now=wc.not_after + timedelta(seconds=1))
    assert err.value.code == "expired"
    assert "expired" in str(err.value)
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([wc.leaf], ca.bundle, TD, now=wc.not_before - timedelta(seconds=1))
    assert err.value.code == "not_yet_valid"
    future = ca.issue_workload(SLEEP, now=datetime.now(UTC) + timedelta(days=1))
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([future.leaf], ca.bundle, TD)
    assert err.value.code == "not_yet_valid"


def test_verify_rejects_cert_from_another_ca(ca):
    impostor_ca = CertificateAuthority.create(TD)  # same trust domain, same names, other keys
    wc = impostor_ca.issue_workload(SLEEP)
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([wc.leaf], ca.bundle, TD)
    assert err.value.code == "bad_signature"  # issuer name matches ours, signature does not
    with pytest.raises(IdentityError) as err:
        verify_peer_chain(wc.chain, ca.bundle, TD)
    assert err.value.code in {"bad_signature", "unknown_issuer"}
    stranger = CertificateAuthority.create("cluster.local").issue_workload(SLEEP)
    with pytest.raises(IdentityError):
        verify_peer_chain([stranger.leaf], TrustBundle((ca.root_cert,)), TD)


def _leaf_with(ca, names, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,), subject=None, ca_bit=False):
    key = generate_private_key()
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(ca.intermediate_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca_bit, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca._key, hashes.SHA256())


def test_verify_rejects_no_uri_san_two_uri_sans_and_non_workload_uris(ca):
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([_leaf_with(ca, None)], ca.bundle, TD)
    assert err.value.code == "no_uri_san"
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([_leaf_with(ca, [x509.DNSName("sleep.default.svc")])], ca.bundle, TD)
    assert err.value.code == "no_uri_san"
    two = [x509.UniformResourceIdentifier(str(SLEEP)), x509.UniformResourceIdentifier(str(HTTPBIN))]
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([_leaf_with(ca, two)], ca.bundle, TD)
    assert err.value.code == "multiple_uri_sans"
    node = ca.issue_node("node-a")
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([node.leaf], ca.bundle, TD)
    assert err.value.code == "bad_spiffe_id"


def test_verify_rejects_ca_cert_as_leaf_and_empty_chain(ca):
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([ca.intermediate_cert], ca.bundle, TD)
    assert err.value.code == "bad_leaf"
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([], ca.bundle, TD)
    assert err.value.code == "no_certificate"
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([None], ca.bundle, TD)  # getpeercert() when the peer sent nothing
    assert err.value.code == "no_certificate"
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([b"not a certificate"], ca.bundle, TD)
    assert err.value.code == "bad_certificate"


def test_verify_rejects_leaf_signed_by_a_non_ca(ca):
    wc = ca.issue_workload(SLEEP)
    key = generate_private_key()
    now = datetime.now(UTC)
    # A workload tries to act as an issuer: its own leaf "signs" another identity.
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([])).issuer_name(wc.leaf.subject)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(HTTPBIN))]), critical=True)
        .sign(wc.key, hashes.SHA256())
    )
    with pytest.raises(IdentityError):
        verify_peer_chain([forged, wc.leaf], ca.bundle, TD)


# ---- credentials files ------------------------------------------------------------------------------


def test_write_files_keys_are_private_and_read_back(ca, tmp_path):
    wc = ca.issue_workload(SLEEP)
    cert_path, key_path, roots_path = wc.write_files(tmp_path / "creds")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert cert_path.read_bytes().count(b"BEGIN CERTIFICATE") == 2  # leaf + intermediate
    assert roots_path.read_bytes().count(b"BEGIN CERTIFICATE") == 1  # the root only
    again = WorkloadCert.read_files(tmp_path / "creds")
    assert again.identity == SLEEP and again.serial_number == wc.serial_number
    assert verify_peer_chain([again.leaf], again.roots, TD) == SLEEP
    os.chmod(key_path, 0o644)
    with pytest.raises(IdentityError) as err:
        WorkloadCert.read_files(tmp_path / "creds")
    assert err.value.code == "key_permissions"


def test_ssl_files_are_temporary(ca):
    wc = ca.issue_workload(SLEEP)
    with wc.ssl_files() as (cert_path, key_path, roots_path):
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(key_path.parent).st_mode) == 0o700
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, key_path)
        ctx.load_verify_locations(roots_path)
    assert not key_path.exists() and not key_path.parent.exists()


def test_workload_cert_refuses_mismatched_key_or_identity_and_hides_key(ca):
    wc = ca.issue_workload(SLEEP)
    with pytest.raises(IdentityError) as err:
        WorkloadCert(key=generate_private_key(), chain=wc.chain, roots=wc.roots)
    assert err.value.code == "key_mismatch"
    with pytest.raises(IdentityError) as err:
        WorkloadCert(key=wc.key, chain=wc.chain, roots=wc.roots, identity=HTTPBIN)
    assert err.value.code == "identity_mismatch"
    assert "PRIVATE" not in repr(wc) and str(SLEEP) in repr(wc)
    assert wc.not_before < wc.refresh_at < wc.not_after
    assert wc.refresh_at - wc.not_before == (wc.not_after - wc.not_before) / 2


def test_trust_bundle_refuses_non_ca_and_garbage(ca):
    wc = ca.issue_workload(SLEEP)
    with pytest.raises(IdentityError, match="not a CA"):
        TrustBundle((wc.leaf,))
    with pytest.raises(IdentityError, match="no root"):
        TrustBundle(())
    with pytest.raises(IdentityError, match="no PEM certificate"):
        TrustBundle.from_pem(b"garbage")
    assert TrustBundle.from_pem(ca.bundle.roots_pem()).roots == (ca.root_cert,)


# ---- real TLS ------------------------------------------------------------------------------------------


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext):
    """One real TLS 1.3 handshake over loopback; returns (server-seen peer DER, client-seen peer DER, error)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["server_peer"] = tls.getpeercert(binary_form=True)
                seen["server_peer_dict"] = tls.getpeercert()
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["server_error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client_ctx.wrap_socket(raw) as tls:
            seen["client_peer"] = tls.getpeercert(binary_form=True)
            seen["alpn"] = tls.selected_alpn_protocol()
            seen["data"] = tls.recv(2)
    except (ssl.SSLError, OSError) as exc:
        seen["client_error"] = exc
    finally:
        thread.join(10)
        listener.close()
    return seen


def test_mutual_tls_presents_chain_and_spiffe_ids_survive(ca):
    server = ca.issue_workload(HTTPBIN)
    client = ca.issue_workload(SLEEP)
    # Each side trusts only the root (roots_pem), so the handshake works only if the intermediate is sent.
    seen = _handshake(mtls_server_context(server, ["h2"]), mtls_client_context(client, ["h2"]))
    assert seen.get("data") == b"ok", seen
    assert seen["alpn"] == "h2"
    assert verify_peer_chain([seen["server_peer"]], server.roots, TD) == SLEEP
    assert verify_peer_chain([seen["client_peer"]], client.roots, TD) == HTTPBIN
    assert ("URI", str(SLEEP)) in seen["server_peer_dict"]["subjectAltName"]


def test_mutual_tls_refuses_peer_from_another_ca(ca):
    stranger = CertificateAuthority.create(TD).issue_workload(SLEEP)
    server = ca.issue_workload(HTTPBIN)
    seen = _handshake(mtls_server_context(server), mtls_client_context(stranger))
    assert "server_error" in seen and "server_peer" not in seen


def test_verify_rejects_chain_through_an_expired_intermediate():
    past = datetime.now(UTC) - timedelta(days=2)
    old_ca = CertificateAuthority.create(TD, now=past, intermediate_ttl=timedelta(hours=1))
    wc = old_ca.issue_workload(SLEEP, ttl=timedelta(minutes=30), now=past)
    assert verify_peer_chain([wc.leaf], old_ca.bundle, TD, now=past + timedelta(minutes=5)) == SLEEP
    with pytest.raises(IdentityError) as err:
        verify_peer_chain([wc.leaf], old_ca.bundle, TD)
    assert err.value.code == "expired" and "intermediate" in str(err.value)
