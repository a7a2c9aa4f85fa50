"""``write_report``: PNG figures of a run, whatever state the run is in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from medbloom.errors import MedbloomError
from medbloom.plots import write_report
from medbloom.runs import METRICS_COLUMNS
from test_dashboard import write_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL = ["learning_curves.png", "partition.png", "confusion_matrix.png"]


def _check_png(path: Path, min_size: tuple[int, int] = (300, 200)) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > 1000
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
    assert width >= min_size[0] and height >= min_size[1], (path.name, img.size)
    return width, height


@pytest.mark.parametrize(
    ("kind", "done"), [("finished", None), ("running", 2), ("failed", 1), ("interrupted", 3)]
)
def test_report_of_each_kind_of_run(tmp_path: Path, kind: str, done: int | None) -> None:
    run = write_run(tmp_path, kind, kind, rounds=5, done=done)
    written = write_report(run)
    assert [p.name for p in written] == ALL
    for p in written:
        assert p.parent == run
        _check_png(p)
    width, height = _check_png(run / "learning_curves.png", (1200, 400))
    assert width > 2 * height  # three panels side by side
    # written atomically: no temporary file is left behind
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_report_with_many_classes_and_hospitals(tmp_path: Path) -> None:
    run = write_run(tmp_path, "derma", "finished", dataset="dermamnist", num_clients=12, rounds=3)
    write_report(run)
    _, height = _check_png(run / "partition.png")
    assert height >= 12 * 30  # a row per hospital
    _check_png(run / "confusion_matrix.png")


def test_report_replaces_old_figures(tmp_path: Path) -> None:
    run = write_run(tmp_path, "r", "running", rounds=5, done=1)
    write_report(run)
    first = (run / "learning_curves.png").read_bytes()
    write_run(tmp_path, "r2", "finished", rounds=5)  # unrelated: r is unchanged
    row = {c: "0.8" for c in METRICS_COLUMNS} | {"round": "2", "loss": "0.5", "clients_ok": "3"}
    with (run / "metrics.csv").open("a", encoding="utf-8") as fh:
        fh.write(",".join(row[c] for c in METRICS_COLUMNS) + "\n")
    write_report(run)
    assert (run / "learning_curves.png").read_bytes() != first


def test_report_without_metrics_or_per_class(tmp_path: Path) -> None:
    """Created but nothing recorded yet: the partition is known, nothing else."""
    run = write_run(tmp_path, "r", "running", rounds=3, done=0)
    for name in ("metrics.csv", "per_class.jsonl", "summary.json"):
        (run / name).unlink()
    (run / "metrics.csv").write_text("round,loss,accuracy,auc\n5,0.3", encoding="utf-8")
    assert [p.name for p in write_report(run)] == ["partition.png"]


def test_report_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(MedbloomError, match="not a run directory") as err:
        write_report(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(MedbloomError, match="not a run directory"):
        write_report(tmp_path / "absent")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(MedbloomError, match="not a run directory"):
        write_report(tmp_path / "file.txt")


def test_report_of_a_run_with_nothing_to_plot(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(MedbloomError, match="nothing to plot yet"):
        write_report(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_plots_drawn_as_a_run_ends_are_titled_with_how_it_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run draws its plots just before summary.json says it finished: the title must
    not say "running, round 5 of 5"."""
    from medbloom import plots

    run = write_run(tmp_path, "ending", "running", rounds=5, done=5)
    titles: list[str] = []
    real = plots._title
    monkeypatch.setattr(plots, "_title", lambda r: titles.append(real(r)) or titles[-1])
    write_report(run, "finished")
    assert titles and all("finished, round 5 of 5" in t for t in titles), titles
    write_report(run)  # without it, the summary's status
    assert "running, round 5 of 5" in titles[-1]
