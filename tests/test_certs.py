"""medbloom.certs: the files it writes. A real secure deployment using them (TLS,
registered and unregistered node keys, a node that does not trust the CA) is in
test_multisite.py."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medbloom.certs import (
    CertBundle,
    connection_toml,
    load_bundle,
    make_certs,
)
from medbloom.errors import MedbloomError

# ---------------------------------------------------------------------------
# make_certs / load_bundle
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    return make_certs(tmp_path_factory.mktemp("certs") / "out", num_nodes=2)


def test_layout_and_permissions(bundle: CertBundle) -> None:
    d = bundle.directory
    names = sorted(p.name for p in d.iterdir())
    expected = ["ca.crt", "ca.key", "server.pem", "server.key"]
    expected += ["node_0", "node_0.pub", "node_1", "node_1.pub"]
    assert names == sorted(expected)
    assert bundle.ca_cert == d / "ca.crt" and bundle.ca_key == d / "ca.key"
    assert bundle.server_cert == d / "server.pem" and bundle.server_key == d / "server.key"
    assert bundle.node_keys == [(d / f"node_{i}", d / f"node_{i}.pub") for i in range(2)]
    private = [bundle.ca_key, bundle.server_key] + [k for k, _ in bundle.node_keys]
    public = [bundle.ca_cert, bundle.server_cert] + [p for _, p in bundle.node_keys]
    for path in private:
        assert path is not None
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in public:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert not [p for p in d.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_server_cert_is_signed_by_ca_with_sans(bundle: CertBundle) -> None:
    ca = x509.load_pem_x509_certificate(bundle.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(bundle.server_cert.read_bytes())

    ca.verify_directly_issued_by(ca)  # self-signed
    server.verify_directly_issued_by(ca)  # raises if not signed by the CA

    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku

    # The server key in server.key is the one in the certificate.
    key = serialization.load_pem_private_key(bundle.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()  # type: ignore[union-attr]


def test_node_keys_are_what_flower_loads(bundle: CertBundle) -> None:
    # flower-supernode: load_ssh_private_key -> EllipticCurvePrivateKey;
    # flwr supernode register: load_ssh_public_key -> EC key on a NIST curve.
    for private_path, public_path in bundle.node_keys:
        assert private_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        private = serialization.load_ssh_private_key(private_path.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        line = public_path.read_text()
        assert line.startswith("ecdsa-sha2-nistp384 ") and line.endswith("\n")
        public = serialization.load_ssh_public_key(public_path.read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.public_numbers() == private.public_key().public_numbers()
    a, b = (p.read_bytes() for p, _ in bundle.node_keys)
    assert a != b


def test_custom_hosts_and_days(tmp_path: Path) -> None:
    b = make_certs(tmp_path, 0, hosts=["10.0.0.5", "::1", "hub.example.org"], days=2)
    assert b.node_keys == []
    server = x509.load_pem_x509_certificate(b.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["hub.example.org"]
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 2 * 86400 <= lifetime.total_seconds() <= 2 * 86400 + 600


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    first = make_certs(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(MedbloomError) as info:
        make_certs(tmp_path, 1)
    message = str(info.value)
    assert "\n" not in message and "already exists" in message
    assert str(tmp_path) in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched

    # A single leftover file is enough to refuse (here a node key beyond the old count).
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "node_1").write_text("x")
    with pytest.raises(MedbloomError, match="node_1"):
        make_certs(fresh, 2, overwrite=False)
    assert [p.name for p in fresh.iterdir()] == ["node_1"]  # refused before writing anything

    again = make_certs(tmp_path, 2, overwrite=True)
    assert again.ca_cert.read_bytes() != before["ca.crt"]
    assert stat.S_IMODE(again.node_keys[1][0].stat().st_mode) == 0o600
    assert first.ca_cert == again.ca_cert


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(MedbloomError):
        make_certs(tmp_path / "a", -1)
    with pytest.raises(MedbloomError):
        make_certs(tmp_path / "b", 1, hosts=[])
    with pytest.raises(MedbloomError):
        make_certs(tmp_path / "c", 1, hosts=["not a host!"])
    with pytest.raises(MedbloomError):
        make_certs(tmp_path / "d", 1, days=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedbloomError, match="not a directory"):
        make_certs(tmp_path / "file", 1)


def test_load_bundle_roundtrip_and_errors(tmp_path: Path) -> None:
    made = make_certs(tmp_path / "b", 3)
    assert load_bundle(tmp_path / "b") == made

    with pytest.raises(MedbloomError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")

    (tmp_path / "b" / "ca.key").unlink()  # the CA key is optional
    assert load_bundle(tmp_path / "b").ca_key is None

    (tmp_path / "b" / "node_2.pub").unlink()
    with pytest.raises(MedbloomError, match=r"node_2\.pub is missing"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "node_2").unlink()
    assert load_bundle(tmp_path / "b").num_nodes == 2

    (tmp_path / "b" / "node_0").rename(tmp_path / "b" / "node_7")
    (tmp_path / "b" / "node_0.pub").rename(tmp_path / "b" / "node_7.pub")
    with pytest.raises(MedbloomError, match="node_0 is missing"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "node_7").rename(tmp_path / "b" / "node_0")
    (tmp_path / "b" / "node_7.pub").rename(tmp_path / "b" / "node_0.pub")

    # A public key that does not match its private key.
    (tmp_path / "b" / "node_0.pub").write_bytes((tmp_path / "b" / "node_1.pub").read_bytes())
    with pytest.raises(MedbloomError, match="not the public key"):
        load_bundle(tmp_path / "b")

    (tmp_path / "b" / "server.pem").unlink()
    with pytest.raises(MedbloomError) as info:
        load_bundle(tmp_path / "b")
    assert "server.pem is missing" in str(info.value) and "\n" not in str(info.value)


def test_connection_toml(tmp_path: Path) -> None:
    import tomllib

    text = connection_toml("secure", "127.0.0.1:9000", tmp_path / "ca.crt")
    table = tomllib.loads(text)["superlink"]["secure"]
    assert table == {"address": "127.0.0.1:9000", "root-certificates": str(tmp_path / "ca.crt")}
    with pytest.raises(MedbloomError):
        connection_toml("bad name", "127.0.0.1:9000", tmp_path / "ca.crt")
