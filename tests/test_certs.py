"""medbloom.certs: the files it writes, and a real secure Flower deployment using them.

The end-to-end test starts ``flower-superlink`` with TLS and ``--enable-supernode-auth``
on 127.0.0.1, registers one node key with ``flwr supernode register``, and checks that
the registered SuperNode comes online and runs a round of a tiny Flower app, while a
SuperNode with an unregistered key, and one that does not trust the CA, are refused.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
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

BIN = Path(sys.executable).parent
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


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


# ---------------------------------------------------------------------------
# A real secure deployment on 127.0.0.1
# ---------------------------------------------------------------------------

TOY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "toyapp"
version = "1.0.0"
dependencies = ["flwr==1.41.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "medbloom-test"

[tool.flwr.app.components]
serverapp = "toyapp.server:app"
clientapp = "toyapp.client:app"

[tool.flwr.app.config]
rounds = 1
"""

TOY_SERVER = """\
import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                      min_train_nodes=1, min_available_nodes=1)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(3, "float32")]),
                            num_rounds=1, timeout=60)
    print("TOYRESULT", result.arrays.to_numpy_ndarrays()[0].tolist(), flush=True)
"""

TOY_CLIENT = """\
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()[0] + 1.0
    metrics = MetricRecord({"num-examples": 10})
    return Message(RecordDict({"arrays": ArrayRecord([arrays]), "metrics": metrics}),
                   reply_to=msg)
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _children_by_parent_pid(pid: int) -> list[int]:
    """flower-superexec processes that Flower detached (own session) for parent ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(args[:-1]):
            if arg == b"--parent-pid" and args[i + 1] == str(pid).encode():
                found.append(int(entry.name))
    return found


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then SIGKILL, each process we started, and the helpers Flower detached."""
    detached = [child for p in procs for child in _children_by_parent_pid(p.pid)]
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
    # Detached helpers watch their parent and exit on their own; make sure they did.
    deadline = time.monotonic() + 10
    for pid in detached:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_secure_deployment_registered_node_joins_unregistered_refused(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", num_nodes=2)
    other_ca = make_certs(tmp_path / "other", num_nodes=0)  # a CA the SuperLink does not use
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    port = _free_port()
    (flwr_home / "config.toml").write_text(
        connection_toml("secure", f"127.0.0.1:{port}", certs.ca_cert)
    )
    env = {
        **os.environ,
        **FLWR_ENV,
        "FLWR_HOME": str(flwr_home),
        # flower-superlink / flower-supernode start `flower-superexec` by name from PATH.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }

    def flwr(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def supernode(key: Path, ca: Path, log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                str(BIN / "flower-supernode"),
                "--root-certificates",
                str(ca),
                "--superlink",
                f"127.0.0.1:{port}",
                "--auth-supernode-private-key",
                str(key),
                "--port",
                str(_free_port()),
                "--node-config",
                "partition-id=0 num-partitions=1",
            ],
            env=env,
            cwd=tmp_path,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    procs: list[subprocess.Popen[bytes]] = []
    link_log = tmp_path / "superlink.log"
    try:
        superlink = subprocess.Popen(
            [
                str(BIN / "flower-superlink"),
                *certs.superlink_tls_args(),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(tmp_path / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
            env=env,
            cwd=tmp_path,
            stdout=link_log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(superlink)

        def superlink_up() -> bool:
            assert superlink.poll() is None, link_log.read_text()
            # uvicorn logs "startup complete" before it binds; "running on" after.
            return f"Uvicorn running on https://127.0.0.1:{port}" in link_log.read_text()

        _wait_for(superlink_up, 30, "the SuperLink")

        # TLS: the port speaks TLS and presents server.pem, which verifies against ca.crt.
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        served = x509.load_der_x509_certificate(der or b"")
        assert served == x509.load_pem_x509_certificate(certs.server_cert.read_bytes())

        # Register node_0 only.
        reg = flwr(
            "supernode", "register", str(certs.node_keys[0][1]), "secure", "--format", "json"
        )
        assert reg.returncode == 0, reg.stdout + reg.stderr
        node_id = int(json.loads(reg.stdout[reg.stdout.index("{") :])["node-id"])

        def status() -> str:
            out = flwr("supernode", "list", "secure", "--format", "json")
            assert out.returncode == 0, out.stdout + out.stderr
            nodes = json.loads(out.stdout[out.stdout.index("{") :])["nodes"]
            return {int(n["node-id"]): n["status"] for n in nodes}.get(node_id, "absent")

        assert status() == "registered"

        # The registered node comes online.
        good_log = tmp_path / "node0.log"
        good = supernode(certs.node_keys[0][0], certs.ca_cert, good_log)
        procs.append(good)
        _wait_for(lambda: f"SuperNode ID: {node_id}" in good_log.read_text(), 30, "node_0")
        _wait_for(lambda: status() == "online", 30, "node_0 online")

        # An unregistered key is refused: Flower prints exit code 305, the process exits 1.
        bad_log = tmp_path / "node1.log"
        started = time.monotonic()
        bad = supernode(certs.node_keys[1][0], certs.ca_cert, bad_log)
        procs.append(bad)
        rc = bad.wait(timeout=60)
        refused_after = time.monotonic() - started
        text = bad_log.read_text()
        assert rc == 1, text
        assert "Exit Code: 305" in text and "Failed to activate SuperNode" in text, text
        assert refused_after < 60
        print(f"unregistered SuperNode refused after {refused_after:.1f} s")
        assert "No SuperNode found with the given public key" in link_log.read_text()

        # A node that does not trust the SuperLink's CA fails the TLS handshake.
        wrong_log = tmp_path / "node_wrong_ca.log"
        wrong = supernode(certs.node_keys[0][0], other_ca.ca_cert, wrong_log)
        procs.append(wrong)
        assert wrong.wait(timeout=60) == 1
        assert "CERTIFICATE_VERIFY_FAILED" in wrong_log.read_text()

        # The registered node is still online and runs a round of a tiny app over TLS.
        assert good.poll() is None, good_log.read_text()
        app = tmp_path / "toyapp"
        (app / "toyapp").mkdir(parents=True)
        (app / "pyproject.toml").write_text(TOY_PYPROJECT)
        (app / "toyapp" / "__init__.py").write_text("")
        (app / "toyapp" / "server.py").write_text(textwrap.dedent(TOY_SERVER))
        (app / "toyapp" / "client.py").write_text(textwrap.dedent(TOY_CLIENT))
        run = flwr("run", str(app), "secure", "--stream", timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "TOYRESULT [1.0, 1.0, 1.0]" in run.stdout + run.stderr, run.stdout + run.stderr
    except BaseException:
        for log in sorted(tmp_path.glob("*.log")):
            print(f"----- {log.name} -----\n{log.read_text()[-4000:]}")
        raise
    finally:
        _stop(procs)
    assert all(p.poll() is not None for p in procs)
