"""Progress of long work: a bar on a terminal, whole lines in a log file or pipe."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from medbloom.data.folders import load_folder_dataset
from medbloom.progress import LineProgress, progress_bar


def test_lines_not_carriage_returns_when_the_output_is_not_a_terminal() -> None:
    out = io.StringIO()
    with progress_bar(1000, "decode x", "img", stream=out) as bar:
        assert isinstance(bar, LineProgress)
        bar.every = 0.0  # a line at every update, to see them
        for _ in range(3):
            bar.update(100)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[:3] == [ln for ln in lines[:3] if ln.startswith("decode x: ")]
    assert "100/1000 img (10%)" in lines[0] and "300/1000 img (30%)" in lines[-1]


def test_few_lines_for_many_updates() -> None:
    out = io.StringIO()
    with progress_bar(100_000, "hash", "img", stream=out) as bar:
        for _ in range(100_000):
            bar.update()
    assert out.getvalue().count("\n") <= 3  # the closing line, and one per 10 s at most


def test_disabled_prints_nothing() -> None:
    out = io.StringIO()
    with progress_bar(10, "x", stream=out, enabled=False) as bar:
        bar.update(10)
    assert out.getvalue() == ""


def test_decoding_into_a_log_file_writes_lines(tmp_path: Path, capfd: object) -> None:
    root = tmp_path / "set"
    for split, n in (("Training", 6), ("Testing", 2)):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(folder / f"{i}.png")
    load_folder_dataset(
        root, name="t", image_size=8, channels=1, cache_dir=tmp_path / "c", workers=1
    )
    err = capfd.readouterr().err  # type: ignore[attr-defined]
    assert "decode t: 16/16 img (100%)" in err
    assert "\r" not in err
