"""Real deployment on one machine: a SuperLink and one process per hospital, over the network.

``medbloom launch`` starts Flower's Deployment Engine as separate OS processes on
127.0.0.1 (Flower's SuperLink, from :mod:`medbloom.federation.superlink`, and
``--num-clients`` hospital processes from :mod:`medbloom.federation.node`), submits
the experiment with ``flwr run`` and follows its run directory. Every process it
starts is stopped when the run ends, fails, or the user presses Ctrl-C; the exit
code says how it ended (0 finished, 1 failed, 130 interrupted).

Per-process logs go to ``RUN_DIR/logs``: ``superlink.log``, ``client_<i>.log``,
``flwr-run.log``, and the ServerApp's own ``server.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from medbloom.certs import CertBundle, connection_toml, load_bundle, make_certs
from medbloom.config import ExperimentConfig
from medbloom.errors import MedbloomError
from medbloom.runs import atomic_write_text, mark_summary, read_metrics
from medbloom.system import ablated, pack_onto_cpus, pin_process

CONNECTION = "medbloom"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def project_dir() -> Path:
    """The Flower App folder ``flwr run`` submits: the repository holding medbloom."""
    import medbloom

    root = Path(medbloom.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise MedbloomError(
            "medbloom launch needs the medbloom source tree (pip install -e .): "
            f"no pyproject.toml at {root}"
        )
    return root


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process: offline, and the venv's tools on PATH
    (flower-superlink starts flower-superexec by name)."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def run_config_toml(cfg: ExperimentConfig) -> str:
    """The experiment as a TOML file for ``flwr run -c FILE`` (every knob, typed)."""
    lines = []
    for key, value in cfg.to_run_config().items():
        text = json.dumps(value) if isinstance(value, str) else repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MedbloomError(f"{what} exited with code {proc.returncode} at start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise MedbloomError(f"{what} did not open port {port} within {timeout:.0f} s")


class Deployment:
    """The processes of one federation on this machine; a context manager that stops
    every process it started, by PID, on the way out."""

    def __init__(self, run_dir: Path, secure: CertBundle | None = None) -> None:
        self.run_dir = run_dir
        self.secure = secure
        self.flwr_home = run_dir / "flwr"
        self.flwr_home.mkdir(exist_ok=True)
        self.logs = run_dir / "logs"
        self.env = flower_env(self.flwr_home)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self.port = 0

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def _start(self, name: str, cmd: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = (self.logs / log_name).open("ab")
        self._logs[name] = log
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.run_dir,
            start_new_session=True,  # Ctrl-C goes to medbloom launch, which stops them in order
        )
        self.procs[name] = proc
        # Which process is which, for the user (and tests) to stop or inspect one by PID.
        pids = {n: p.pid for n, p in self.procs.items()}
        atomic_write_text(self.flwr_home / "pids.json", json.dumps(pids, indent=1) + "\n")
        return proc

    def start_superlink(self) -> int:
        self.port = free_port()
        tls = self.secure.superlink_tls_args() if self.secure else ["--insecure"]
        proc = self._start(
            "superlink",
            [
                sys.executable,
                "-m",
                "medbloom.federation.superlink",
                *tls,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
            "superlink.log",
        )
        wait_for_port(self.port, proc, 60, "the SuperLink")
        address = f"127.0.0.1:{self.port}"
        if self.secure:
            table = connection_toml(CONNECTION, address, self.secure.ca_cert)
        else:
            table = f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
        atomic_write_text(self.flwr_home / "config.toml", table)
        return self.port

    def register(self, node: int) -> None:
        """Register node ``node``'s public key with the SuperLink (secure mode)."""
        assert self.secure is not None
        pub = self.secure.node_keys[node][1]
        res = subprocess.run(
            ["flwr", "supernode", "register", str(pub), CONNECTION],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.run_dir,
        )
        if res.returncode != 0:
            raise MedbloomError(
                f"could not register {pub}: {res.stdout.strip()} {res.stderr.strip()}"
            )

    def start_node(self, node: int, node_config: str, key: int | None = None) -> None:
        tls = (
            self.secure.supernode_tls_args(node if key is None else key)
            if self.secure
            else ["--insecure"]
        )
        self._start(
            f"client_{node}",
            [
                sys.executable,
                "-m",
                "medbloom.federation.node",
                "--port",
                str(free_port()),
                "--superlink",
                f"127.0.0.1:{self.port}",
                *tls,
                "--node-config",
                node_config,
            ],
            f"client_{node}.log",
        )

    def submit(self, cfg: ExperimentConfig) -> None:
        config_file = self.flwr_home / "run-config.toml"
        atomic_write_text(config_file, run_config_toml(cfg))
        self._start(
            "flwr-run",
            ["flwr", "run", str(project_dir()), CONNECTION, "--stream", "-c", str(config_file)],
            "flwr-run.log",
        )

    def pin_nodes(self, cpus: list[int]) -> None:
        """Give hospital process ``i`` CPU ``cpus[i]`` alone (with others, where there
        are more hospitals than CPUs).

        Ten single-threaded hospitals on two cores otherwise share both cores evenly:
        the largest, which ends every round, gets a fifth of a core while the others
        train, and trains alone on one core at the end while the other core idles (on
        the default experiment 9.3 s of training a round instead of 7.5). Packed by
        data size, the cores finish together, as the simulation's one-worker-per-core
        queue does. Done once every node has trained once: the first round's work
        (imports, data, model) is the same for every node, and pinned from the
        start, nine of them would do it on one core.
        """
        for i, cpu in enumerate(cpus):
            proc = self.procs.get(f"client_{i}")
            if proc is not None and proc.poll() is None:
                pin_process(proc.pid, {cpu})

    def exited(self, names: tuple[str, ...]) -> tuple[str, int] | None:
        """The first of the named processes that has exited, with its exit code."""
        for name in names:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                return name, proc.returncode
        return None

    def dead_nodes(self) -> list[str]:
        """Hospital processes that have exited."""
        return [
            n for n, p in self.procs.items() if n.startswith("client_") and p.poll() is not None
        ]

    def stop(self, names: list[str], grace: float = 10.0) -> None:
        """SIGTERM the named processes together, wait up to ``grace`` seconds for
        all of them, then SIGKILL what is left. (One by one, ten SuperNodes took
        15 s to stop.)"""
        procs = [(n, self.procs.pop(n)) for n in names if n in self.procs]
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if name in self._logs:
                self._logs.pop(name).close()

    def stop_all(self) -> None:
        """The run submitter first, then the hospitals, then the SuperLink."""
        self.stop(["flwr-run"])
        self.stop([n for n in self.procs if n.startswith("client_")])
        self.stop(["superlink"])
        self.stop(list(self.procs))
        self._stop_orphaned_apps()

    def _stop_orphaned_apps(self) -> None:
        """Stop app processes our SuperLink started (flwr-serverapp, flower-superexec).

        They normally end with their SuperLink; one whose SuperLink was killed (a
        crashed server) can be left waiting on a port nobody serves. They name our
        SuperLink's port in their command line, so they are found by it.
        """
        if not self.port:
            return
        marker = f"127.0.0.1:{self.port}"
        pids = []
        for proc_dir in Path("/proc").glob("[0-9]*"):
            try:
                args = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in args and ("flwr-serverapp" in args or "flower-superexec" in args):
                with contextlib.suppress(OSError):
                    os.kill(int(proc_dir.name), signal.SIGTERM)
                    pids.append(int(proc_dir.name))
        # waited for, so that nothing they write on the way out comes after launch returns
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _running(pid)]
            time.sleep(0.1)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def node_cpus(run_dir: Path, num_clients: int) -> list[int]:
    """The CPU each hospital process trains on: the hospitals packed onto this
    process's CPUs by their training samples, largest first (see
    :meth:`Deployment.pin_nodes`)."""
    try:
        clients = json.loads((run_dir / "partitions.json").read_text())["clients"]
        loads = [float(c["num_train"]) for c in clients][:num_clients]
    except (OSError, ValueError, KeyError, TypeError):
        loads = []
    if len(loads) != num_clients:
        loads = [1.0] * num_clients
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    return pack_onto_cpus(loads, cpus)


def node_config(cfg: ExperimentConfig, node: int) -> str:
    return (
        f"partition-id={node} num-partitions={cfg.num_clients} data-dir={json.dumps(cfg.data_dir)}"
    )


def launch(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    secure: bool = False,
    certs_dir: Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    stop: Any = None,
    resume: bool = False,
    poll: float = 0.25,
) -> str:
    """Run the experiment through the Deployment Engine; return the run's final status.

    ``stop`` (an Event) ends the run cleanly: ``RUN_DIR/STOP`` tells the ServerApp,
    then every process is stopped.
    """
    bundle = None
    if secure:
        certs_dir = certs_dir or run_dir / "certs"
        bundle = (
            load_bundle(certs_dir)
            if (certs_dir / "ca.crt").exists()
            else make_certs(certs_dir, cfg.num_clients)
        )
        if bundle.num_nodes < cfg.num_clients:
            raise MedbloomError(
                f"{certs_dir} holds {bundle.num_nodes} node keys; "
                f"--num-clients is {cfg.num_clients}"
            )
    (run_dir / "STOP").unlink(missing_ok=True)
    seen = len(read_metrics(run_dir)) if resume else 0
    # pinned once the first training round is recorded (round 0 too, in a new run):
    # a node's first round imports, loads and builds, the same work for every node.
    pin_at = seen + (1 if resume else 2)
    cpus: list[int] | None = None
    started = time.time()
    failure = ""
    with Deployment(run_dir, bundle) as dep:
        dep.start_superlink()
        for i in range(cfg.num_clients):
            if bundle:
                dep.register(i)
            dep.start_node(i, node_config(cfg, i))
        dep.submit(cfg)
        status = "running"
        while True:
            rows = read_metrics(run_dir)
            for row in rows[seen:]:
                if on_round is not None:
                    best = max(
                        (r for r in rows[: rows.index(row) + 1] if r.get("val_auc") is not None),
                        key=lambda r: r["val_auc"],
                        default=None,
                    )
                    on_round({**row, "best": best})
            if len(rows) > seen and len(rows) >= pin_at and not ablated("pin"):
                cpus = cpus or node_cpus(run_dir, cfg.num_clients)
                dep.pin_nodes(cpus)  # each round: also a hospital process that rejoined
            seen = len(rows)
            status = _status(run_dir, started)
            if status in ("finished", "failed", "interrupted"):
                break
            gone = dep.exited(("superlink", "flwr-run"))
            if gone:
                status = _status(run_dir, started)
                if status == "running":
                    status = "failed"
                    name, code = gone
                    failure = (
                        f"the {'SuperLink' if name == 'superlink' else 'flwr run'} process "
                        f"exited unexpectedly (exit code {code}; see logs/{name}.log)"
                    )
                break
            dead = dep.dead_nodes()
            if cfg.num_clients - len(dead) < min(cfg.min_clients, cfg.num_clients):
                (run_dir / "STOP").touch()
                _wait_for_status(run_dir, 30)
                logs = ", ".join(f"logs/{name}.log" for name in dead)
                raise MedbloomError(f"hospital processes exited ({logs}); stopping the run")
            if stop is not None and stop.is_set():
                (run_dir / "STOP").touch()
                _wait_for_status(run_dir, 30)
                status = "interrupted"
                break
            time.sleep(poll)
    if failure:
        # Every process has ended (the ServerApp too, which a stop made record a
        # KeyboardInterrupt): the summary says what happened.
        mark_summary(run_dir, "failed", failure)
    return status


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception): ")


def failure_reason(run_dir: Path) -> str:
    """Why a launched run failed: the error summary.json records, else the last
    exception line of the ServerApp's output (a failure before the run directory's
    records were opened), else where to look."""
    try:
        error = json.loads((run_dir / "summary.json").read_text()).get("error")
        if error:
            return str(error)
    except (OSError, ValueError, AttributeError):
        pass
    for name in ("flwr-run.log", "server.log"):
        try:
            text = _ANSI.sub("", (run_dir / "logs" / name).read_text(errors="replace"))
        except OSError:
            continue
        found = [ln.strip() for ln in text.splitlines() if _ERROR_LINE.match(ln.strip())]
        if found:
            return found[-1]
    return f"see the logs in {run_dir / 'logs'}"


def _status(run_dir: Path, since: float = 0.0) -> str:
    """The run's status, as its ServerApp last wrote it after ``since`` (a resumed
    run's summary.json still holds the old run's ending until the new one starts)."""
    path = run_dir / "summary.json"
    try:
        if path.stat().st_mtime < since:
            return "running"
        return str(json.loads(path.read_text())["status"])
    except (OSError, ValueError, KeyError):
        return "running"


def _wait_for_status(run_dir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _status(run_dir) == "running":
        time.sleep(0.2)


def check_host(host: str, allow_insecure_remote: bool) -> None:
    """Insecure mode only on a loopback address, unless the user insists (then warn)."""
    if host in LOOPBACK:
        return
    if not allow_insecure_remote:
        raise MedbloomError(
            f"refusing to serve without TLS on {host}: use --secure, or "
            "--allow-insecure-remote if this network is trusted"
        )
    print(
        f"medbloom: warning: serving WITHOUT TLS on {host}; weights travel in clear text",
        file=sys.stderr,
    )
