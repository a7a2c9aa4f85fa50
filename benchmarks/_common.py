"""Helpers the benchmark scripts share: run `medbloom run` in a subprocess and watch it.

`watch_run` starts the real CLI, notes when each row of metrics.csv appears (polled),
and samples the memory of every process the run starts: its process tree, plus Ray's
processes (raylet, gcs_server, `ray::` workers), which Ray daemonises away from the
tree, when they started after the run did. Memory is read from /proc (PSS from
smaps_rollup, RSS from status), so no extra package is needed.
"""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "datasets"
MEDBLOOM = [sys.executable, "-m", "medbloom"]
ENV = {
    **os.environ,
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
RAY_MARKERS = ("ray::", "raylet", "gcs_server", "default_worker.py", "dashboard/agent.py")
_CLK = os.sysconf("SC_CLK_TCK")


def check_data() -> None:
    if not (DATA_DIR / "medmnist" / "pneumoniamnist.npz").is_file():
        sys.exit(f"real data not found: {DATA_DIR}/medmnist/pneumoniamnist.npz")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------- /proc memory
def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat")
    # Field 22 (starttime), counted after the ")" that closes the command name.
    rest = stat.rpartition(")")[2].split()
    return int(rest[19]) if len(rest) > 19 else -1


def _boot_time() -> float:
    for line in _read("/proc/stat").splitlines():
        if line.startswith("btime"):
            return float(line.split()[1])
    return 0.0


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        rest = _read(f"/proc/{name}/stat").rpartition(")")[2].split()
        if len(rest) > 1:
            kids.setdefault(int(rest[1]), []).append(int(name))
    return kids


def _memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in kB; (0, 0) if it is gone or unreadable."""
    pss = rss = 0
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1])
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return pss or rss, rss


def run_processes(root: int, since: float) -> list[int]:
    """The process tree under ``root`` plus Ray processes started after ``since`` (epoch s)."""
    kids = _children_map()
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(kids.get(pid, []))
    boot = _boot_time()
    uid = os.getuid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in found:
            continue
        pid = int(name)
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
        except OSError:
            continue
        cmd = _read(f"/proc/{pid}/cmdline").replace("\0", " ")
        # Ray names its session folder after the driver's PID: this run's Ray, not
        # another user's, even if it left the tree (reparented to init).
        ours = f"_{root}/" in cmd or f"_{root} " in cmd
        if ours and any(m in cmd for m in RAY_MARKERS):
            if boot + _start_ticks(pid) / _CLK >= since - 1:
                found.add(pid)
    return sorted(found)


@dataclass
class MemorySampler:
    """Samples the summed PSS and RSS of a run's processes every ``interval`` seconds."""

    root: int
    since: float
    interval: float = 0.2
    peak_pss_kb: int = 0
    peak_rss_kb: int = 0
    peak_processes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = run_processes(self.root, self.since)
            pss = rss = 0
            for pid in pids:
                p, r = _memory_kb(pid)
                pss, rss = pss + p, rss + r
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_processes = max(self.peak_processes, len(pids))
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# ------------------------------------------------------------------- a real run
@dataclass
class WatchedRun:
    wall: float  # spawn to exit, seconds
    row_times: dict[int, float]  # round -> seconds after spawn its metrics row appeared
    metrics: list[dict[str, float]]
    clients: list[dict[str, str]]
    returncode: int
    output: str
    peak_pss_gb: float = float("nan")
    peak_rss_gb: float = float("nan")
    peak_processes: int = 0
    run_dir: Path = Path()

    def round_seconds(self, first: int = 1) -> list[float]:
        """Seconds per round from ``first`` on: training exchange plus the server's
        evaluation (``round_seconds + eval_seconds`` in metrics.csv)."""
        return [
            m["round_seconds"] + m.get("eval_seconds", 0.0)
            for m in self.metrics
            if m["round"] >= first
        ]

    def gaps(self) -> list[float]:
        """Seconds per round by elapsed_seconds (round loop incl. recording)."""
        e = [m["elapsed_seconds"] for m in self.metrics]
        return [b - a for a, b in itertools.pairwise(e)]


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _count_rows(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return max(0, fh.read().count(b"\n") - 1)
    except OSError:
        return 0


def watch_run(
    args: list[str], *, memory: bool = False, timeout: float = 3600, keep: Path | None = None
) -> WatchedRun:
    """Run ``medbloom run ARGS --out TMP`` and time it from outside."""
    tmp = Path(tempfile.mkdtemp(prefix="medbloom-bench-"))
    out = keep or tmp / "run"
    since = time.time()
    t0 = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            [*MEDBLOOM, "run", *args, "--out", str(out)],
            cwd=REPO,
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        sampler = MemorySampler(proc.pid, since).start() if memory else None
        metrics_file = out / "metrics.csv"
        row_times: dict[int, float] = {}
        while proc.poll() is None:
            n = _count_rows(metrics_file)
            for r in range(len(row_times), n):
                row_times[r] = time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                proc.terminate()
            time.sleep(0.05)
        wall = time.monotonic() - t0
        if sampler is not None:
            sampler.stop()
        log.seek(0)
        output = log.read()
    metrics = [{k: float(v) for k, v in row.items() if v != ""} for row in read_csv(metrics_file)]
    run = WatchedRun(
        wall,
        row_times,
        metrics,
        read_csv(out / "clients.csv"),
        proc.returncode,
        output,
        run_dir=out,
    )
    if sampler is not None:
        run.peak_pss_gb = sampler.peak_pss_kb / 2**20
        run.peak_rss_gb = sampler.peak_rss_kb / 2**20
        run.peak_processes = sampler.peak_processes
    if keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        print(output[-3000:], file=sys.stderr)
        raise SystemExit(f"medbloom run {' '.join(args)} failed with code {proc.returncode}")
    return run


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join([line, sep, *body])


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 10 else f"{c:.1f}"
    return str(c)
