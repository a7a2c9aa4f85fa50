"""A full disk under ``--out`` ends a run with one line naming the file and the cause,
exit code 1, the files written before intact and the summary marked failed. The disk
is a real 120 KiB tmpfs, mounted in a private mount namespace (``unshare``) so that
the test needs no privileges and leaves no mount behind."""

from __future__ import annotations

import csv
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic import write_npz

pytestmark = pytest.mark.slow


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def _on_small_disk(tmp_path: Path, kib: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``medbloom ARGS --out DISK/run`` with DISK a tmpfs of ``kib`` KiB; what the run
    left on it is copied to ``tmp_path/left`` (the tmpfs goes with the namespace)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = shlex.join([sys.executable, "-m", "medbloom", *args, "--out", str(disk / "run")])
    script = (
        f"mount -t tmpfs -o size={kib}k tmpfs {shlex.quote(str(disk))} || exit 99\n"
        f"{cmd}\nrc=$?\n"
        f"cp -a {shlex.quote(str(disk))} {shlex.quote(str(tmp_path / 'left'))}\nexit $rc\n"
    )
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(not _namespaces_work(), reason="unshare cannot mount a tmpfs here")
def test_a_full_disk_fails_the_run_in_one_line_and_marks_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_npz(data, "pneumoniamnist", counts={"train": 120, "val": 20, "test": 20}, seed=3)
    # 120 KiB: the run directory is prepared, the first checkpoint does not fit
    done = _on_small_disk(
        tmp_path, 120, "run", "--data-dir", str(data), "--num-clients", "2", "--rounds", "2"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("medbloom: error:")]
    assert len(errors) == 1, done.stderr
    assert "checkpoints/" in errors[0] and "No space left on device" in errors[0], errors[0]
    run = tmp_path / "left" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "No space left on device" in summary["error"]
    # what was written before the disk filled is whole
    assert json.loads((run / "config.json").read_text())["config"]["dataset"] == "pneumoniamnist"
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and rows[0]["round"] == "0"
    assert not [p.name for p in run.rglob(".*") if p.is_file()], "temporary files left"


@pytest.mark.skipif(not _namespaces_work(), reason="unshare cannot mount a tmpfs here")
def test_a_disk_too_small_to_prepare_the_run_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_npz(data, "pneumoniamnist", counts={"train": 120, "val": 20, "test": 20}, seed=3)
    done = _on_small_disk(tmp_path, 8, "run", "--data-dir", str(data), "--num-clients", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "No space left on device" in done.stderr
    assert not any((tmp_path / "left").iterdir())
