"""TLS certificates and SuperNode authentication keys for a secure Flower deployment.

``make_certs(out_dir, num_nodes)`` writes, with the ``cryptography`` package only (no
``openssl`` subprocess), everything a SuperLink with TLS and SuperNode authentication
needs. File layout inside ``out_dir``:

==================  =====  ===========================================================
file                mode   content
==================  =====  ===========================================================
``ca.crt``          0o644  local CA certificate (self-signed, ``CA:TRUE``), PEM.
                           SuperLink ``--ssl-ca-certfile``, SuperNode
                           ``--root-certificates``, ``root-certificates`` of a
                           ``[superlink.NAME]`` connection in ``$FLWR_HOME/config.toml``.
``ca.key``          0o600  CA private key (EC P-384), PEM PKCS#8, unencrypted. Needed only
                           to sign more certificates; keep it off the nodes.
``server.pem``      0o644  SuperLink certificate signed by the CA, PEM, with one
                           subjectAltName per host (IP addresses as ``IPAddress``, names
                           as ``DNSName``). SuperLink ``--ssl-certfile``.
``server.key``      0o600  SuperLink private key (EC P-384), PEM PKCS#8, unencrypted.
                           SuperLink ``--ssl-keyfile``.
``node_<i>``        0o600  SuperNode ``i``'s authentication private key: EC P-384 in
                           OpenSSH format (``-----BEGIN OPENSSH PRIVATE KEY-----``).
                           ``flower-supernode --auth-supernode-private-key``.
``node_<i>.pub``    0o644  Its public key, one OpenSSH line
                           (``ecdsa-sha2-nistp384 AAAA... medbloom-node-<i>``).
                           ``flwr supernode register node_<i>.pub CONNECTION``.
==================  =====  ===========================================================

Why these formats: Flower 1.42 (as 1.41) loads the SuperNode key with
``cryptography``'s ``load_ssh_private_key`` and requires an ``EllipticCurvePrivateKey``
(ed25519 or RSA keys make ``flower-supernode`` exit with code 302), and ``flwr supernode
register`` loads the public key with ``load_ssh_public_key`` and accepts only NIST curves
(P-192 ... P-521; otherwise exit code 500). P-384 is the curve Flower's docs use.

Every file is written to a temporary name in ``out_dir`` and renamed (``os.replace``);
private keys are created 0o600 from the start. Nothing is written when any target file
already exists, unless ``overwrite=True``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medbloom.errors import MedbloomError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
NODE_KEY_PREFIX = "node_"
PUBLIC_SUFFIX = ".pub"

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

_CURVE = ec.SECP384R1
_NODE_KEY_RE = re.compile(rf"^{NODE_KEY_PREFIX}(\d+)$")
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertBundle:
    """Paths of the files of a secure deployment (see the module docstring).

    ``node_keys[i]`` is ``(private, public)`` for SuperNode ``i``: ``node_<i>`` and
    ``node_<i>.pub``. ``ca_key`` is ``None`` in a directory brought without the CA key.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[tuple[Path, Path]]
    directory: Path
    ca_key: Path | None = None

    @property
    def num_nodes(self) -> int:
        """How many SuperNode key pairs the bundle holds."""
        return len(self.node_keys)

    def superlink_tls_args(self) -> list[str]:
        """``flower-superlink`` flags for TLS and SuperNode authentication."""
        return [
            "--ssl-ca-certfile",
            str(self.ca_cert),
            "--ssl-certfile",
            str(self.server_cert),
            "--ssl-keyfile",
            str(self.server_key),
            "--enable-supernode-auth",
        ]

    def supernode_tls_args(self, node: int) -> list[str]:
        """``flower-supernode`` flags for TLS and authentication with node key ``node``."""
        if not 0 <= node < len(self.node_keys):
            raise MedbloomError(
                f"no SuperNode key {node} in {self.directory} "
                f"(it holds {len(self.node_keys)}: node_0 .. node_{len(self.node_keys) - 1})"
            )
        return [
            "--root-certificates",
            str(self.ca_cert),
            "--auth-supernode-private-key",
            str(self.node_keys[node][0]),
        ]


def make_certs(
    out_dir: Path,
    num_nodes: int,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
    overwrite: bool = False,
) -> CertBundle:
    """Create a local CA, a SuperLink certificate and ``num_nodes`` SuperNode key pairs.

    Args:
        out_dir: Directory for the files (created, mode 0o700, if missing).
        num_nodes: Number of SuperNode authentication key pairs (``node_0`` ...).
        hosts: Names and IP addresses the SuperLink is reached at; each becomes a
            subjectAltName of ``server.pem`` (the first is also its common name).
        days: Validity of both certificates, from now.
        overwrite: Replace files that already exist instead of refusing.

    Returns:
        The paths of the files written.

    Raises:
        MedbloomError: A bad argument, or a target file exists and ``overwrite`` is False.
    """
    if num_nodes < 0:
        raise MedbloomError(f"certs: number of nodes must be >= 0, got {num_nodes}")
    if days < 1:
        raise MedbloomError(f"certs: validity must be at least 1 day, got {days}")
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise MedbloomError("certs: at least one host name or IP address is needed")
    sans = [_san(h) for h in hosts]

    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise MedbloomError(f"certs: {out_dir} exists and is not a directory")
    bundle = _bundle_paths(out_dir, num_nodes, with_ca_key=True)
    if not overwrite:
        for path in _all_files(bundle):
            if path.exists() or path.is_symlink():
                raise MedbloomError(
                    f"certs: {path} already exists; refusing to overwrite it "
                    "(choose another directory or pass overwrite)"
                )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC)
    not_before = now - _CLOCK_SKEW
    not_after = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medbloom"),
            x509.NameAttribute(NameOID.COMMON_NAME, "medbloom local CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(_CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medbloom"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    pem = serialization.Encoding.PEM
    _write_atomic(bundle.ca_cert, ca_cert.public_bytes(pem), PUBLIC_MODE)
    assert bundle.ca_key is not None
    _write_atomic(bundle.ca_key, _pem_private(ca_key), PRIVATE_MODE)
    _write_atomic(bundle.server_cert, server_cert.public_bytes(pem), PUBLIC_MODE)
    _write_atomic(bundle.server_key, _pem_private(server_key), PRIVATE_MODE)
    for i, (private_path, public_path) in enumerate(bundle.node_keys):
        node_key = ec.generate_private_key(_CURVE())
        private_bytes = node_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public_line = node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write_atomic(private_path, private_bytes, PRIVATE_MODE)
        _write_atomic(public_path, public_line + f" medbloom-node-{i}\n".encode(), PUBLIC_MODE)
    return bundle


def load_bundle(directory: Path) -> CertBundle:
    """The bundle in ``directory``: made by ``make_certs`` or brought by the user.

    ``ca.crt``, ``server.pem`` and ``server.key`` must exist; ``ca.key`` is optional.
    Node keys are every ``node_<i>`` / ``node_<i>.pub`` pair, sorted by ``i``; the
    indices must run 0, 1, ... without gaps, so that ``node_keys[i]`` is ``node_<i>``.
    The certificates must be PEM and the node keys EC keys in OpenSSH format.

    Raises:
        MedbloomError: The directory or a file is missing, or a file has the wrong format.
    """
    directory = Path(directory).expanduser().absolute()
    if not directory.is_dir():
        raise MedbloomError(f"certs: directory {directory} does not exist")
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (directory / name).is_file():
            raise MedbloomError(
                f"certs: {directory / name} is missing (expected {CA_CERT}, {SERVER_CERT}, "
                f"{SERVER_KEY}, node_<i> and node_<i>.pub in {directory})"
            )

    indices: set[int] = set()
    for entry in directory.iterdir():
        name = entry.name.removesuffix(PUBLIC_SUFFIX)
        match = _NODE_KEY_RE.match(name)
        if match:
            indices.add(int(match.group(1)))
    for expected, index in enumerate(sorted(indices)):
        if index != expected:
            raise MedbloomError(
                f"certs: {directory / f'{NODE_KEY_PREFIX}{expected}'} is missing "
                f"(node keys must be numbered 0, 1, ... without gaps; found node_{index})"
            )
    bundle = _bundle_paths(directory, len(indices), with_ca_key=(directory / CA_KEY).is_file())
    for private_path, public_path in bundle.node_keys:
        for path in (private_path, public_path):
            if not path.is_file():
                raise MedbloomError(
                    f"certs: {path} is missing (each node key needs node_<i> and node_<i>.pub)"
                )

    for path in (bundle.ca_cert, bundle.server_cert):
        try:
            x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            raise MedbloomError(f"certs: {path} is not a PEM certificate") from None
    for private_path, public_path in bundle.node_keys:
        _check_node_key(private_path, public_path)
    return bundle


def connection_toml(name: str, address: str, ca_cert: Path) -> str:
    """A ``[superlink.NAME]`` table for ``$FLWR_HOME/config.toml`` that uses TLS.

    ``address`` is the SuperLink's ``host:port`` (in Flower 1.42 one HTTP port serves the
    Fleet, Control and Runtime APIs). ``root-certificates`` is written as an absolute path:
    the ``flwr`` CLI reads it relative to its working directory, not to the config file.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise MedbloomError(f"certs: connection name {name!r} must be letters, digits, - or _")
    ca = str(Path(ca_cert).expanduser().absolute())
    return f'[superlink.{name}]\naddress = "{_toml_escape(address)}"\n' + (
        f'root-certificates = "{_toml_escape(ca)}"\n'
    )


def _bundle_paths(directory: Path, num_nodes: int, *, with_ca_key: bool) -> CertBundle:
    return CertBundle(
        ca_cert=directory / CA_CERT,
        server_cert=directory / SERVER_CERT,
        server_key=directory / SERVER_KEY,
        node_keys=[
            (
                directory / f"{NODE_KEY_PREFIX}{i}",
                directory / f"{NODE_KEY_PREFIX}{i}{PUBLIC_SUFFIX}",
            )
            for i in range(num_nodes)
        ],
        directory=directory,
        ca_key=directory / CA_KEY if with_ca_key else None,
    )


def _all_files(bundle: CertBundle) -> list[Path]:
    files = [bundle.ca_cert, bundle.server_cert, bundle.server_key]
    if bundle.ca_key is not None:
        files.append(bundle.ca_key)
    for private_path, public_path in bundle.node_keys:
        files += [private_path, public_path]
    return files


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?", host):
        raise MedbloomError(f"certs: {host!r} is neither an IP address nor a host name")
    return x509.DNSName(host)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_node_key(private_path: Path, public_path: Path) -> None:
    try:
        private_key = serialization.load_ssh_private_key(private_path.read_bytes(), None)
    except (ValueError, UnsupportedAlgorithm):
        raise MedbloomError(
            f"certs: {private_path} is not an unencrypted OpenSSH private key"
        ) from None
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise MedbloomError(f"certs: {private_path} is not an elliptic-curve (ECDSA) key")
    try:
        public_key = serialization.load_ssh_public_key(public_path.read_bytes())
    except (ValueError, UnsupportedAlgorithm):
        raise MedbloomError(f"certs: {public_path} is not an OpenSSH public key") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.public_numbers() != (
        private_key.public_key().public_numbers()
    ):
        raise MedbloomError(f"certs: {public_path} is not the public key of {private_path}")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _toml_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
