"""From a run to a model people can use: calibration, predict, export, evaluate, and
checkpoints that never run code when loaded.

One small real run (a synthetic four-class brain MRI set in the official folder layout,
PNG files, two hospitals, two rounds, Flower's simulation engine) serves every test;
the commands run as real processes on it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA, Cli
from medbloom.calibration import (
    calibrated,
    class_bias_report,
    expected_calibration_error,
    fit_class_bias,
    fit_temperature,
    logits_of,
    scaled,
)
from medbloom.config import ExperimentConfig
from synthetic import write_npz

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
SIZE = 32
TIMEOUT = 300


def _slice(rng: np.random.Generator, label: int, side: int = 72) -> np.ndarray:
    """A dark frame with a bright oval 'head', and a class-specific bright spot."""
    yy, xx = np.mgrid[:side, :side]
    img = rng.normal(10, 4, (side, side))
    head = ((yy - side / 2) / (side * 0.38)) ** 2 + ((xx - side / 2) / (side * 0.3)) ** 2 < 1
    img[head] = rng.normal(110, 15, int(head.sum()))
    cy, cx = [(24, 24), (24, 48), (36, 36), (48, 36)][label]
    spot = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
    if label != 2:
        img[spot] = 240
    return np.clip(img, 0, 255).astype(np.uint8)


def write_brain_set(root: Path, per_class: tuple[int, int] = (14, 5), names=CLASSES) -> Path:
    rng = np.random.default_rng(0)
    for split, n in zip(("Training", "Testing"), per_class, strict=True):
        for label, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_slice(rng, label)).save(folder / f"{split[:2]}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medbloom.experiment import prepare_run
    from medbloom.federation.simulation import run_simulation

    tmp = tmp_path_factory.mktemp("use")
    data = tmp / "data"
    write_brain_set(data / "brain-tumor-mri")
    cfg = ExperimentConfig(
        dataset="brain-tumor-mri",
        data_dir=str(data),
        size=SIZE,
        model="cnn",
        num_clients=2,
        rounds=2,
        batch_size=8,
        min_partition_size=4,
        out=str(tmp / "run"),
    ).validate()
    path = prepare_run(cfg)
    run_simulation(cfg, path)
    return path


@pytest.fixture(scope="module")
def images(run_dir: Path) -> Path:
    """The synthetic set's test images plus a broken file and a text file."""
    folder = run_dir.parent / "to-score"
    shutil.copytree(run_dir.parent / "data" / "brain-tumor-mri" / "Testing", folder)
    (folder / "glioma" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.txt").write_text("not an image")  # not an image suffix: not listed
    return folder


def medbloom(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "medbloom", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medbloom: error:"), proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------ calibration


def test_temperature_scaling_lowers_an_over_confident_models_ece() -> None:
    """Planted: the model is right 70 % of the time and says 99 %."""
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 3, n)
        right = rng.random(n) < 0.7
        pred = np.where(right, labels, (labels + 1 + rng.integers(0, 2, n)) % 3)
        probs = np.full((n, 3), 0.005)
        probs[np.arange(n), pred] = 0.99
        return labels, probs

    val, test = split(2000), split(2000)
    before = expected_calibration_error(*test, "multi-class")
    t = fit_temperature(*val, "multi-class")
    after = expected_calibration_error(test[0], scaled(test[1], t, "multi-class"), "multi-class")
    assert before == pytest.approx(0.29, abs=0.03)
    assert t > 1.5 and after < 0.05 < before
    # scaling never changes a prediction
    assert (scaled(test[1], t, "multi-class").argmax(1) == test[1].argmax(1)).all()


def _shifted_model(n: int, rng: np.random.Generator, shift: float) -> tuple[np.ndarray, ...]:
    """Planted: three classes equally common; the model's logits say the true class
    fairly well, but it has learnt a prior against class 0 (its logit lowered by
    ``shift``), as a federated model does whose largest hospital seldom sees it."""
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), labels] += 2.0
    logits[:, 0] -= shift
    return labels, calibrated(logits, 1.0, "multi-class")


def test_class_bias_correction_undoes_a_models_prior_against_a_class() -> None:
    rng = np.random.default_rng(3)
    val, test = _shifted_model(3000, rng, 2.0), _shifted_model(3000, rng, 2.0)
    fitted = fit_class_bias(*val, "multi-class")
    assert fitted is not None
    t, bias = fitted
    assert bias.sum() == pytest.approx(0, abs=1e-9)  # centred: only differences count
    # The true posterior is known: the logit of the true class is N(2, 1), the others'
    # N(0, 1), so log p(class | logits) = 2 * (logit + shift on class 0) + a constant:
    # temperature 1/2 and, for class 0, a bias 2 * shift above the others'.
    assert t == pytest.approx(0.5, abs=0.05)
    assert bias[0] - bias[1:].mean() == pytest.approx(4.0, abs=0.4)
    clean = np.arange(0, 3000, 2)  # a subset given by indices, as the clean split is
    report = class_bias_report(*val, *test, "multi-class", clean)
    assert report is not None
    before, after = report["test"]["before"], report["test"]["after"]
    assert before["recall"][0] < 0.5 < 0.7 < after["recall"][0]
    assert after["accuracy"] > before["accuracy"] + 0.05
    assert after["balanced_accuracy"] > before["balanced_accuracy"] + 0.05
    assert report["clean"]["after"]["accuracy"] > report["clean"]["before"]["accuracy"]
    labels, probs = test
    expected = (probs[clean].argmax(1) == labels[clean]).mean()
    assert report["clean"]["before"]["accuracy"] == pytest.approx(expected)
    corrected = calibrated(logits_of(probs, "multi-class"), t, "multi-class", bias)
    assert report["test"]["after"]["accuracy"] == pytest.approx(
        (corrected.argmax(1) == labels).mean()
    )


def test_class_bias_correction_of_an_unbiased_model_changes_little() -> None:
    rng = np.random.default_rng(4)
    val, test = _shifted_model(3000, rng, 0.0), _shifted_model(3000, rng, 0.0)
    report = class_bias_report(*val, *test, "multi-class")
    assert report is not None
    assert max(abs(b) for b in report["bias"]) < 0.15
    before, after = report["test"]["before"], report["test"]["after"]
    assert after["accuracy"] == pytest.approx(before["accuracy"], abs=0.01)


def test_class_bias_correction_is_not_fitted_where_it_cannot_be() -> None:
    rng = np.random.default_rng(5)
    labels, probs = _shifted_model(200, rng, 1.0)
    # a class absent from validation: its bias would run off to minus infinity
    assert fit_class_bias(np.where(labels == 2, 1, labels), probs, "multi-class") is None
    assert fit_class_bias(labels[:0], probs[:0], "multi-class") is None
    multi = (rng.random((50, 4)) < 0.3).astype(int)
    assert fit_class_bias(multi, rng.random((50, 4)), "multi-label, binary-class") is None


def test_ece_of_a_calibrated_binary_model_is_small_and_of_a_wrong_one_large() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(20000)
    labels = (rng.random(20000) < p).astype(int)
    probs = np.stack([1 - p, p], axis=1)
    assert expected_calibration_error(labels, probs, "binary-class") < 0.02
    assert expected_calibration_error(1 - labels, probs, "binary-class") > 0.2


def test_every_run_reports_calibration_fitted_on_validation(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    record = json.loads((run_dir / "calibration.json").read_text())
    for which in ("best", "final"):
        entry = summary["calibration"][which]
        assert entry["fitted_on"] == "validation split"
        assert 0.05 <= entry["temperature"] <= 20
        assert 0 <= entry["test_ece_before"] <= 1 and 0 <= entry["test_ece_after"] <= 1
        assert "reliability_before" not in entry  # the bins are in calibration.json only
        bins = record[which]["reliability_before"]
        assert sum(b["count"] for b in bins) == 20  # the test split's images
        # the class-bias correction, fitted on the same validation split; its "before"
        # is the run's own score of the same model
        bias = entry["class_bias"]
        assert bias["fitted_on"] == "validation split" and len(bias["bias"]) == 4
        assert sum(bias["bias"]) == pytest.approx(0, abs=1e-6)
        assert set(bias) >= {"test", "clean"}
    final = summary["calibration"]["final"]["class_bias"]["test"]["before"]
    assert final["accuracy"] == pytest.approx(summary["final"]["accuracy"])
    assert final["balanced_accuracy"] == pytest.approx(summary["final"]["balanced_accuracy"])
    from medbloom.cli import summary_lines

    line = next(x for x in summary_lines(summary) if x.startswith("class-bias correction"))
    best = summary["calibration"]["best"]["class_bias"]["clean"]
    assert f"clean test acc {best['after']['accuracy']:.4f}" in line
    assert f"(without {best['before']['accuracy']:.4f})" in line
    assert (run_dir / "reliability.png").stat().st_size > 5000


def test_predict_with_class_biases_applies_the_fitted_ones(
    run_cli: Cli, run_dir: Path, images: Path, tmp_path: Path
) -> None:
    from medbloom.trained import load_trained, preprocess

    out = tmp_path / "pred.csv"
    proc = run_cli("predict", str(run_dir), str(images), "--out", str(out), "--calibration",
                   "class-bias", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "class biases" in proc.stdout
    fitted = json.loads((run_dir / "calibration.json").read_text())["best"]["class_bias"]
    trained = load_trained(run_dir, "best", "class-bias")
    assert trained.temperature == fitted["temperature"]
    assert trained.bias is not None and list(trained.bias) == fitted["bias"]
    for row in _rows(out)[:5]:
        x = torch.from_numpy(preprocess(trained, Path(row["path"]))[None]).float() / 127.5 - 1
        with torch.no_grad():
            logits = trained.model(x).numpy()
        expected = calibrated(
            logits, fitted["temperature"], "multi-class", np.array(fitted["bias"])
        )
        p = np.array([float(row[f"p_{c}"]) for c in CLASSES])
        assert p == pytest.approx(expected[0], abs=1e-5)
    # a run that recorded none (made before medbloom fitted one): one line, exit 2
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    record = json.loads((old / "calibration.json").read_text())
    for entry in record.values():
        entry.pop("class_bias")
    (old / "calibration.json").write_text(json.dumps(record))
    for command in (["predict", str(old), str(images)], ["export", str(old)]):
        proc = run_cli(*command, "--calibration", "class-bias", "--out", str(tmp_path / "o"),
                       cwd=tmp_path)  # fmt: skip
        one_line_error(proc, "--calibration class-bias", "--calibration temperature")


# ------------------------------------------------------------------ predict


def test_predict_scores_a_folder_and_skips_a_broken_file(run_dir: Path, images: Path) -> None:
    from medbloom.trained import load_trained, preprocess

    out = run_dir.parent / "pred.csv"
    proc = medbloom("predict", str(run_dir), str(images), "--out", str(out), cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stderr and "broken.png" in proc.stderr
    assert "20 image(s) scored" in proc.stdout and "1 skipped" in proc.stdout
    rows = _rows(out)
    assert len(rows) == 20 and all("broken" not in r["path"] for r in rows)
    assert list(rows[0]) == ["path", "predicted"] + [f"p_{c}" for c in CLASSES]
    trained = load_trained(run_dir)
    for row in rows[:5]:
        p = np.array([float(row[f"p_{c}"]) for c in CLASSES])
        assert p.sum() == pytest.approx(1, abs=1e-5)
        assert row["predicted"] == CLASSES[int(p.argmax())]
        x = torch.from_numpy(preprocess(trained, Path(row["path"]))[None]).float() / 127.5 - 1
        assert p == pytest.approx(trained.probabilities(x)[0], abs=1e-5)


def test_predict_uses_the_runs_own_preprocessing(run_dir: Path) -> None:
    """The file decoded by predict equals what the data loader stored for it."""
    from medbloom.data.registry import load_dataset
    from medbloom.trained import load_trained, preprocess

    trained = load_trained(run_dir)
    assert trained.crop and trained.spec.in_channels == 1 and trained.spec.image_size == SIZE
    splits = load_dataset("brain-tumor-mri", SIZE, run_dir.parent / "data", progress=False)
    files = sorted((run_dir.parent / "data" / "brain-tumor-mri" / "Testing").rglob("*.png"))
    mine = {preprocess(trained, f).tobytes() for f in files}
    assert mine == {img.tobytes() for img in splits.test.images}


def test_predict_with_nothing_readable_is_one_line(
    run_cli: Cli, run_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "bad.png").write_text("no image here")
    proc = run_cli("predict", str(run_dir), str(tmp_path / "bad.png"), "--out",
                    str(tmp_path / "p.csv"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "skipped" in proc.stderr


@pytest.mark.parametrize("case", ["not-a-run", "no-checkpoints", "missing-path"])
def test_bad_input_is_one_line_with_exit_2(
    run_cli: Cli, run_dir: Path, tmp_path: Path, case: str
) -> None:
    target = run_dir
    paths = [str(run_dir.parent / "to-score")]
    if case == "not-a-run":
        target = tmp_path
    elif case == "no-checkpoints":
        target = tmp_path / "copy"
        shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("*.pt"))
    else:
        paths = [str(tmp_path / "nowhere")]
    for command in (["predict", str(target), *paths], ["export", str(target)]):
        if case == "missing-path" and command[0] == "export":
            continue
        proc = run_cli(*command, "--out", str(tmp_path / "o"), cwd=tmp_path)
        expected = {
            "not-a-run": "not a run directory",
            "no-checkpoints": "no checkpoints/best.pt",
            "missing-path": "no such file",
        }[case]
        one_line_error(proc, expected)


# ------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def onnx_file(run_dir: Path) -> Path:
    out = run_dir.parent / "exported" / "model.onnx"
    proc = medbloom("export", str(run_dir), "--format", "onnx", "--out", str(out),
                    cwd=run_dir.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def test_onnx_export_matches_pytorch_and_says_what_it_expects(
    run_dir: Path, images: Path, onnx_file: Path
) -> None:
    import onnxruntime as ort

    from medbloom.trained import image_files, load_trained, preprocess

    trained = load_trained(run_dir)
    meta = json.loads(onnx_file.with_suffix(".onnx.json").read_text())
    assert meta["class_names"] == list(CLASSES) and meta["format"] == "onnx"
    assert meta["preprocessing"]["image_size"] == SIZE
    assert meta["preprocessing"]["channels"] == 1
    assert meta["preprocessing"]["crop_to_foreground"] is True
    assert meta["temperature"] == pytest.approx(trained.temperature)
    assert meta["run_dir"] == str(run_dir.resolve())
    files = [f for f in image_files([images]) if f.name != "broken.png"]
    real = SHARED_DATA / "brain-tumor-mri" / "Testing"
    if real.is_dir():  # real MRI slices too, when the shared data is here
        files += sorted(real.rglob("*.jpg"))[::60][:24]
    x = torch.from_numpy(np.stack([preprocess(trained, f) for f in files])).float() / 127.5 - 1
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = trained.model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_predict_with_the_onnx_file_gives_the_same_classes(
    run_dir: Path, images: Path, onnx_file: Path
) -> None:
    a, b = run_dir.parent / "a.csv", run_dir.parent / "b.csv"
    assert medbloom("predict", str(run_dir), str(images), "--out", str(a),
                    cwd=run_dir.parent).returncode == 0  # fmt: skip
    proc = medbloom("predict", str(run_dir), str(images), "--out", str(b), "--onnx",
                    str(onnx_file), cwd=run_dir.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ra, rb = _rows(a), _rows(b)
    assert [r["predicted"] for r in ra] == [r["predicted"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for c in CLASSES:
            assert float(x[f"p_{c}"]) == pytest.approx(float(y[f"p_{c}"]), abs=1e-4)


def test_torchscript_export_round_trips(run_cli: Cli, run_dir: Path, images: Path) -> None:
    from medbloom.trained import image_files, load_trained, preprocess

    out = run_dir.parent / "ts" / "model.pt"
    proc = run_cli("export", str(run_dir), "--format", "torchscript", "--out", str(out),
                    cwd=run_dir.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    trained = load_trained(run_dir)
    files = [f for f in image_files([images]) if f.name != "broken.png"][:8]
    x = torch.from_numpy(np.stack([preprocess(trained, f) for f in files])).float() / 127.5 - 1
    loaded = torch.jit.load(str(out))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained.model(x), atol=1e-5, rtol=0)
    assert json.loads(out.with_suffix(".pt.json").read_text())["format"] == "torchscript"


# ------------------------------------------------------------------ evaluate


def test_evaluate_on_a_folder_whose_class_names_are_spelt_otherwise(
    run_cli: Cli, run_dir: Path, tmp_path: Path
) -> None:
    other = write_brain_set(tmp_path / "other", (3, 4), ("glioma_tumor", "MENINGIOMA", "No Tumour",
                                                         "Pituitary"))  # fmt: skip
    proc = run_cli("evaluate", str(run_dir), "--dataset", f"folder:{other}", "--split", "all",
                    "--out", str(tmp_path / "e.json"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["images"] == 28 and result["split"] == "all"
    for key in ("accuracy", "auc", "f1"):
        low, high = result["intervals"][key]
        assert low <= result["scores"][key] <= high
    assert "ECE" in proc.stdout and "95% CI" in proc.stdout
    # the same images scored by hand give the same accuracy
    from medbloom.trained import load_trained, preprocess

    trained = load_trained(run_dir)
    files = sorted(other.rglob("*.png"))
    names = [f.parent.name for f in files]
    order = {"glioma_tumor": 0, "MENINGIOMA": 1, "No Tumour": 2, "Pituitary": 3}
    x = torch.from_numpy(np.stack([preprocess(trained, f) for f in files])).float() / 127.5 - 1
    pred = trained.probabilities(x).argmax(1)
    acc = float(np.mean(pred == np.array([order[n] for n in names])))
    assert result["scores"]["accuracy"] == pytest.approx(acc)


def test_evaluate_on_classes_the_model_does_not_know_is_one_line(
    run_cli: Cli, run_dir: Path, tmp_path: Path
) -> None:
    other = write_brain_set(tmp_path / "pets", (2, 2), ("cat", "dog", "glioma", "notumor"))
    proc = run_cli("evaluate", str(run_dir), "--dataset", f"folder:{other}", cwd=tmp_path)
    one_line_error(proc, "cat, dog", "not among the model's")


def test_evaluate_on_images_of_the_wrong_kind_is_one_line(
    run_cli: Cli, run_dir: Path, tmp_path: Path
) -> None:
    """A 3D MedMNIST set for a 2D model."""
    write_npz(tmp_path, "nodulemnist3d", 28)
    proc = run_cli("evaluate", str(run_dir), "--dataset", "nodulemnist3d", "--data-dir",
                    str(tmp_path), cwd=tmp_path)  # fmt: skip
    one_line_error(proc, "3D", "2D")


# ------------------------------------------------------------------ safe to receive


class _Payload:
    """Unpickling this runs a shell command that leaves a file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def planted(run_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A copy of the run whose checkpoints carry a payload beside real weights."""
    copy = tmp_path / "planted"
    shutil.copytree(run_dir, copy)
    marker = tmp_path / "pwned"
    for name in ("best.pt", "latest.pt"):
        path = copy / "checkpoints" / name
        ckpt = torch.load(path, weights_only=True)
        ckpt["extra"] = _Payload(marker)
        torch.save(ckpt, path)
    yield copy, marker
    assert not marker.exists(), "a checkpoint ran code when loaded"


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "resume"])
def test_a_planted_pickle_is_refused_by_every_command(
    run_cli: Cli, planted: tuple[Path, Path], images: Path, tmp_path: Path, command: str
) -> None:
    run, marker = planted
    args = {
        "predict": ["predict", str(run), str(images), "--out", str(tmp_path / "p.csv")],
        "evaluate": ["evaluate", str(run), "--dataset", f"folder:{images}", "--split", "all"],
        "export": ["export", str(run), "--out", str(tmp_path / "m.onnx")],
        "resume": ["run", "--resume", str(run)],
    }[command]
    if command == "resume":
        summary = json.loads((run / "summary.json").read_text())
        summary["status"] = "interrupted"
        (run / "summary.json").write_text(json.dumps(summary))
    # --resume as a real process: a refusal that failed would start Ray here
    proc = (medbloom if command == "resume" else run_cli)(*args, cwd=tmp_path)
    one_line_error(proc, "could run code", "refused")
    assert not marker.exists()
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.onnx").exists()


def test_checkpoints_hold_only_tensors_and_plain_data(run_dir: Path) -> None:
    for name in ("best.pt", "latest.pt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert "strategy" not in ckpt  # no pickled object
    latest = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert "strategy_state" in latest


# ------------------------------------------------------------------ model card


def test_every_run_writes_a_model_card_true_to_its_records(run_dir: Path) -> None:
    card = (run_dir / "model_card.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    final, temperature = summary["final"], summary["calibration"]["best"]["temperature"]
    assert "# Model card: cnn on brain-tumor-mri" in card
    assert ", ".join(CLASSES) in card
    assert f"| final | 2 | {final['accuracy']:.3f}" in card
    low, high = summary["intervals"]["final"]["auc"]
    assert f"{final['auc']:.3f} [{low:.3f}, {high:.3f}]" in card
    assert f"temperature {temperature:.3f}" in card
    assert "No formal privacy guarantee" in card and "**Not for** clinical" in card
    for cid in ("0", "1"):  # a row per hospital
        assert f"\n| {cid} | 2 |" in card


def test_report_rewrites_the_model_card(run_cli: Cli, run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "model_card.md").unlink()
    proc = run_cli("report", str(copy), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    t = json.loads((copy / "summary.json").read_text())["calibration"]["best"]["temperature"]
    assert f"at temperature {t:.3f} (fitted on validation" in proc.stdout
    assert (copy / "model_card.md").read_text() == (run_dir / "model_card.md").read_text().replace(
        run_dir.name, copy.name
    )


# ------------------------------------------------------------------ federated evaluation


def _scored_by_hand(run_dir: Path, cfg: ExperimentConfig) -> dict[int, tuple[int, float]]:
    """Each hospital's image count and accuracy of the scored run's best model on all
    its images, computed here without Flower."""
    from medbloom.experiment import client_data
    from medbloom.metrics import medmnist_acc
    from medbloom.trained import load_trained

    trained = load_trained(run_dir)
    out = {}
    for pid in range(cfg.num_clients):
        data = client_data(cfg, pid, cfg.num_clients)
        x = torch.cat([data.train.x, data.val.x])
        labels = np.concatenate([data.train.labels, data.val.labels])
        probs = trained.probabilities(x)
        out[pid] = (len(labels), medmnist_acc(labels, probs, data.spec.task))
    return out


def test_federated_evaluation_scores_the_model_at_every_hospital_and_trains_nothing(
    run_cli: Cli, run_dir: Path, tmp_path: Path
) -> None:
    from medbloom.experiment import load_run_config, prepare_run
    from medbloom.federation.simulation import run_simulation

    cfg = ExperimentConfig(
        dataset="brain-tumor-mri",
        data_dir=str(run_dir.parent / "data"),
        num_clients=3,
        rounds=20,  # a scoring run has one round whatever is asked
        alpha=1.0,
        min_partition_size=4,
        score_model=str(run_dir),
        out=str(tmp_path / "scored"),
    ).validate()
    scored = prepare_run(cfg)
    cfg = load_run_config(scored)
    assert (cfg.model, cfg.size, cfg.rounds) == ("cnn", SIZE, 1)  # from the scored run
    run_simulation(cfg, scored)
    rows = _rows(scored / "clients.csv")
    assert sorted(int(r["client_id"]) for r in rows) == [0, 1, 2]
    assert all(r["status"] == "ok" and r["round"] == "1" for r in rows)
    by_hand = _scored_by_hand(run_dir, cfg)
    for r in rows:
        n, acc = by_hand[int(r["client_id"])]
        assert int(r["num_examples"]) == n
        assert float(r["site_accuracy"]) == pytest.approx(acc)
        assert r["train_loss"] == ""  # nothing trained
    metrics = _rows(scored / "metrics.csv")
    assert [m["round"] for m in metrics] == ["0", "1"]
    accs = [float(r["site_accuracy"]) for r in rows]
    assert float(metrics[1]["worst_site_accuracy"]) == pytest.approx(min(accs))
    assert metrics[1]["accuracy"] == metrics[0]["accuracy"]  # the same model at the server
    source = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    kept = torch.load(scored / "checkpoints" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(source[k], kept[k]) for k in source)
    summary = json.loads((scored / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 1
    assert "| 2 | 1 |" in (scored / "model_card.md").read_text()  # the per-hospital table
    summary["status"] = "interrupted"
    (scored / "summary.json").write_text(json.dumps(summary))
    one_line_error(run_cli("run", "--resume", str(scored), cwd=tmp_path), "nothing to resume")


def test_federated_evaluation_in_a_deployment(run_dir: Path, tmp_path: Path) -> None:
    """``medbloom launch --score-model``: a SuperLink and a SuperNode per hospital, real
    processes on 127.0.0.1; each hospital scores the model in its own process."""
    out = tmp_path / "scored"
    proc = subprocess.run(
        [sys.executable, "-m", "medbloom", "launch", "--dataset", "brain-tumor-mri",
         "--data-dir", str(run_dir.parent / "data"), "--num-clients", "2",
         "--min-partition-size", "4", "--score-model", str(run_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each hospital on all its own images (federated evaluation):" in proc.stdout
    assert "hospital 0:" in proc.stdout and "hospital 1:" in proc.stdout
    rows = _rows(out / "clients.csv")
    assert sorted(r["client_id"] for r in rows) == ["0", "1"]
    assert all(r["status"] == "ok" for r in rows)
    cfg = ExperimentConfig.from_mapping(json.loads((out / "config.json").read_text())["config"])
    by_hand = _scored_by_hand(run_dir, cfg)
    for r in rows:
        n, acc = by_hand[int(r["client_id"])]
        assert (int(r["num_examples"]), float(r["site_accuracy"])) == (n, pytest.approx(acc))
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("case", ["not-a-run", "other-classes", "privacy"])
def test_score_model_bad_input_is_one_line(
    run_cli: Cli, run_dir: Path, tmp_path: Path, case: str
) -> None:
    write_npz(tmp_path / "d", "pneumoniamnist", 28)
    args = {
        "not-a-run": ["--score-model", str(tmp_path), "--dataset", "brain-tumor-mri",
                      "--data-dir", str(run_dir.parent / "data")],
        "other-classes": ["--score-model", str(run_dir), "--data-dir", str(tmp_path / "d")],
        "privacy": ["--score-model", str(run_dir), "--privacy", "sample"],
    }[case]  # fmt: skip
    proc = run_cli("run", *args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    one_line_error(proc, {"not-a-run": "not a run directory", "other-classes":
                          "not among the model's", "privacy": "trains nothing"}[case])  # fmt: skip
    assert not (tmp_path / "o").exists()
