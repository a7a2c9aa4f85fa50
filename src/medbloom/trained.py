"""A trained model out of a run directory: load it safely, predict, export, evaluate.

Everything a model needs at use time is read from the run directory, never re-typed:
the model and its weights (``checkpoints/best.pt`` or ``latest.pt``, read with
``weights_only=True``: tensors and plain data, never code), the classes, image size,
channels and task (``summary.json``), the preprocessing (the data set's own recipe:
Brain Tumor MRI is cropped to the head, other sets only padded to a square and resized;
pixels scaled to [-1, 1]) and the calibration (``calibration.json``, fitted on the
validation split when the run ended): the temperature, or with ``--calibration
class-bias`` the temperature and per-class biases of the class-bias correction.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medbloom.calibration import MULTI_LABEL, calibrated
from medbloom.config import ExperimentConfig
from medbloom.data.types import DatasetSpec
from medbloom.errors import ConfigError, MedbloomError
from medbloom.training import to_tensor

# What `medbloom predict` reads from a folder: the image formats the loaders decode.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
WHICH = ("best", "final")
CALIBRATIONS = ("temperature", "class-bias")
# the input scaling every medbloom model expects (ImageNet backbones rescale inside)
NORMALISATION = {"scale": 1 / 127.5, "offset": -1.0, "formula": "x / 127.5 - 1 (x: 0-255)"}


class NotARun(MedbloomError):
    """A path that is not a usable run directory."""


@dataclass
class TrainedModel:
    """A run's model, ready to score images (see :func:`load_trained`)."""

    run_dir: Path
    cfg: ExperimentConfig
    spec: DatasetSpec
    model: nn.Module
    which: str
    round: int
    temperature: float
    crop: bool
    # per-class biases added after the temperature (--calibration class-bias); None: none
    bias: np.ndarray | None = None

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {
            "image_size": self.spec.image_size,
            "channels": self.spec.in_channels,
            "colour": "grey" if self.spec.in_channels == 1 else "RGB",
            "crop_to_foreground": self.crop,
            "pad_to_square": True,
            "resize": "bicubic, antialiased",
            "normalisation": NORMALISATION,
            "layout": "N, C, H, W" if self.spec.spatial_dims == 2 else "N, C, D, H, W",
        }

    def describe(self) -> dict[str, Any]:
        """What an exported model expects and where it came from."""
        return {
            "format_version": 1,
            "run_dir": str(self.run_dir.resolve()),
            "model": self.cfg.model,
            "checkpoint": self.which,
            "round": self.round,
            "dataset": self.cfg.dataset,
            "task": self.spec.task,
            "class_names": list(self.spec.class_names),
            "output": "logits; probabilities = "
            + ("sigmoid" if self.spec.task == MULTI_LABEL else "softmax")
            + (
                "(logits / temperature)"
                if self.bias is None
                else "(logits / temperature + class_bias)"
            ),
            "temperature": self.temperature,
            "class_bias": None if self.bias is None else [float(b) for b in self.bias],
            "preprocessing": self.preprocessing,
        }

    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        """Calibrated probabilities of a batch of preprocessed images (float in [-1, 1])."""
        with torch.no_grad():
            logits = self.model(x).float()
        return calibrated(logits.numpy(), self.temperature, self.spec.task, self.bias)


def _read_json(path: Path, run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotARun(f"{run_dir}: not a medbloom run directory (no {path.name})") from None
    except (OSError, ValueError) as exc:
        raise NotARun(f"{run_dir}: {path.name} is unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise NotARun(f"{run_dir}: {path.name} is not a JSON object")
    return data


def run_spec(run_dir: Path) -> DatasetSpec:
    """The data set's spec as the run recorded it (``summary.json``): no data needed."""
    summary = _read_json(run_dir / "summary.json", run_dir)
    try:
        return DatasetSpec(
            name=str(summary["dataset"]),
            task=str(summary["task"]),
            class_names=tuple(str(c) for c in summary["class_names"]),
            in_channels=int(summary["in_channels"]),
            spatial_dims=int(summary["spatial_dims"]),
            image_size=int(summary["image_size"]),
        )
    except (KeyError, TypeError, ValueError):
        raise NotARun(
            f"{run_dir}: summary.json lacks the data set's description (a run that never "
            "started, or one recorded by an older medbloom)"
        ) from None


def temperature_of(run_dir: Path, which: str) -> float:
    """The calibration temperature fitted for the run's ``which`` model; 1.0 (none)
    when the run has no calibration record."""
    try:
        record = json.loads((run_dir / "calibration.json").read_text(encoding="utf-8"))
        t = float(record[which]["temperature"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1.0
    return t if np.isfinite(t) and t > 0 else 1.0


def class_bias_of(run_dir: Path, which: str) -> tuple[float, np.ndarray]:
    """The temperature and per-class biases of the class-bias correction fitted for the
    run's ``which`` model (``calibration.json``); a one-line :class:`ConfigError` when
    the run has none."""
    try:
        record = json.loads((run_dir / "calibration.json").read_text(encoding="utf-8"))
        fitted = record[which]["class_bias"]
        t, bias = float(fitted["temperature"]), np.asarray(fitted["bias"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError):
        fitted = None
    if not fitted or not (np.isfinite(t) and t > 0 and np.isfinite(bias).all()):
        raise ConfigError(
            f"--calibration class-bias: {run_dir} records no class-bias correction for its "
            f"{which} model (calibration.json: a multi-label task, a validation split "
            "without every class, or a run made before medbloom fitted one); use "
            "--calibration temperature"
        )
    return t, bias


def load_trained(
    run_dir: Path, which: str = "best", calibration: str = "temperature"
) -> TrainedModel:
    """The run's ``best`` (highest validation AUC) or ``final`` model with its weights,
    preprocessing and calibration (``temperature``, or ``class-bias``: the temperature
    and per-class biases of :func:`medbloom.calibration.fit_class_bias`); a one-line
    :class:`MedbloomError` for a path that is not a run, a run without checkpoints, a
    checkpoint that is unsafe or broken, or a calibration the run did not record."""
    from medbloom.data.registry import BRAIN_TUMOR_MRI
    from medbloom.experiment import load_run_config
    from medbloom.models import build_model
    from medbloom.runs import load_checkpoint
    from medbloom.training import load_arrays

    if which not in WHICH:
        raise ConfigError(f"--which {which!r}: expected best or final")
    if calibration not in CALIBRATIONS:
        raise ConfigError(f"--calibration {calibration!r}: expected {' or '.join(CALIBRATIONS)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotARun(f"{run_dir}: no such run directory")
    cfg = load_run_config(run_dir)
    from medbloom.config import NO_GLOBAL_MODEL

    if cfg.strategy in NO_GLOBAL_MODEL:
        raise NotARun(
            f"{run_dir}: a --strategy {cfg.strategy} run has no global model to use; each "
            "hospital's model stays at the hospital (its personal-*.pt under hospitals/)"
        )
    spec = run_spec(run_dir)
    path = run_dir / "checkpoints" / ("best.pt" if which == "best" else "latest.pt")
    if not path.is_file():
        raise NotARun(f"{run_dir}: no checkpoints/{path.name} (the run recorded no round yet)")
    bias: np.ndarray | None = None
    if calibration == "class-bias":
        temperature, bias = class_bias_of(run_dir, which)
    else:
        temperature = temperature_of(run_dir, which)
    ckpt = load_checkpoint(path)
    model = build_model(
        cfg.model, spec, pretrained=cfg.pretrained, freeze=cfg.freeze, load_weights=False,
        privacy=cfg.privacy,
    )  # fmt: skip
    try:
        load_arrays(model, ckpt["model"])
    except (ValueError, RuntimeError) as exc:
        raise MedbloomError(f"{path}: the weights do not fit --model {cfg.model} ({exc})") from None
    model.eval()
    return TrainedModel(
        run_dir=run_dir,
        cfg=cfg,
        spec=spec,
        model=model,
        which=which,
        round=int(ckpt["round"]),
        temperature=temperature,
        crop=cfg.dataset == BRAIN_TUMOR_MRI,
        bias=bias,
    )


# ---------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------


def image_files(paths: Sequence[Path]) -> list[Path]:
    """The files named, and the image files under the folders named (recursively,
    sorted, hidden ones left out); a path that does not exist is a one-line error."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(f"{path}: no such file or folder")
    return out


def _batches(files: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]


def preprocess(trained: TrainedModel, path: Path) -> np.ndarray:
    """One image file as the run's data set loader decodes it: ``(C, S, S)`` uint8."""
    from medbloom.data.folders import preprocess_image

    return preprocess_image(
        path,
        image_size=trained.spec.image_size,
        channels=trained.spec.in_channels,
        crop=trained.crop,
    )


def predict_files(
    trained: TrainedModel,
    paths: Sequence[Path],
    out_csv: Path,
    *,
    onnx_model: Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[int, list[tuple[Path, str]]]:
    """Score image files and write ``out_csv`` (path, predicted class, one probability
    column per class); return how many were scored and the files skipped with why.

    With ``onnx_model`` the exported ONNX file scores them (ONNX Runtime) instead of
    the PyTorch model: the same preprocessing and temperature.
    """
    from medbloom.runs import atomic_write_text

    if trained.spec.spatial_dims != 2:
        raise ConfigError(
            f"{trained.run_dir}: predict reads 2D image files, and this run's model "
            f"({trained.spec.name}) takes 3D volumes"
        )
    files = image_files(paths)
    if not files:
        raise ConfigError(
            "no image files found in "
            + ", ".join(str(p) for p in paths)
            + f" (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    session = _onnx_session(onnx_model) if onnx_model is not None else None
    classes = trained.spec.class_names
    multi = trained.spec.task == MULTI_LABEL
    header = ["path", "predicted"] + [f"p_{c}" for c in classes]
    rows: list[list[str]] = []
    skipped: list[tuple[Path, str]] = []
    from medbloom.progress import progress_bar

    with progress_bar(len(files), "predict", unit="img", enabled=progress) as bar:
        for batch in _batches(files, batch_size):
            arrays, kept = [], []
            for path in batch:
                try:
                    arrays.append(preprocess(trained, path))
                    kept.append(path)
                except Exception as exc:  # Pillow raises many kinds for bad files
                    skipped.append((path, f"{type(exc).__name__}: {exc}"))
            if arrays:
                x = to_tensor(np.stack(arrays))
                if session is not None:
                    logits = session.run(None, {"image": x.numpy()})[0]
                    probs = calibrated(logits, trained.temperature, trained.spec.task, trained.bias)
                else:
                    probs = trained.probabilities(x)
                for path, p in zip(kept, probs, strict=True):
                    if multi:
                        predicted = ";".join(c for c, v in zip(classes, p, strict=True) if v >= 0.5)
                    else:
                        predicted = classes[int(np.argmax(p))]
                    rows.append([str(path), predicted] + [f"{v:.6f}" for v in p])
            bar.update(len(batch))
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    atomic_write_text(out_csv, text.getvalue())
    return len(rows), skipped


def _onnx_session(path: Path) -> Any:
    import onnxruntime as ort

    if not path.is_file():
        raise ConfigError(f"--onnx {path}: no such file")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise MedbloomError(f"--onnx {path}: not a model ONNX Runtime can load ({exc})") from None


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------

FORMATS = ("onnx", "torchscript")


def export_model(trained: TrainedModel, fmt: str, out: Path) -> tuple[Path, Path]:
    """Write the model as ``out`` (ONNX or TorchScript; outputs are logits) and
    ``out`` with ``.json``: what it expects (classes, size, channels, normalisation,
    temperature, the run it came from). Returns both paths."""
    from medbloom.runs import atomic_write_json

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected onnx or torchscript")
    from medbloom.models.scatter import ScatterNet

    if isinstance(trained.model, ScatterNet):
        raise ConfigError(
            "--model scatternet cannot be exported: its scattering transform (kymatio) "
            "works on complex FFTs, which ONNX and TorchScript tracing do not support; "
            "`medbloom predict` and `medbloom evaluate` use the run directory as it is"
        )
    spatial = (trained.spec.image_size,) * trained.spec.spatial_dims
    example = torch.zeros(1, trained.spec.in_channels, *spatial)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = trained.model.eval()
    if fmt == "onnx":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(out),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    else:
        import warnings

        # torch 2.13 marks torch.jit deprecated (ONNX is the format to share); the
        # tracer's notes about GroupNorm's batch-size check do not apply to images
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example)  # type: ignore[no-untyped-call]
        traced.save(str(out))
    sidecar = out.with_suffix(out.suffix + ".json")
    atomic_write_json(sidecar, {**trained.describe(), "format": fmt, "input_name": "image"})
    return out, sidecar


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------


def _norm_name(name: str) -> str:
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def class_mapping(run_classes: Sequence[str], data_classes: Sequence[str]) -> np.ndarray:
    """For each of the data set's classes, the run's class of the same name (compared
    ignoring case, spaces, ``_`` and ``-``; for a Brain Tumor MRI model, also under the
    other names its distributions use, as loading reads them: ``glioma_tumor``,
    ``No Tumour``); a one-line error names the classes that have no counterpart."""
    from medbloom.data.registry import BRAIN_TUMOR_CLASSES, brain_tumor_class

    index = {_norm_name(c): i for i, c in enumerate(run_classes)}
    brain = tuple(run_classes) == BRAIN_TUMOR_CLASSES

    def find(name: str) -> int | None:
        if _norm_name(name) in index:
            return index[_norm_name(name)]
        alias = brain_tumor_class(name) if brain else None
        return index[alias] if alias is not None else None

    found = {c: find(c) for c in data_classes}
    missing = [c for c, i in found.items() if i is None]
    if missing:
        raise ConfigError(
            f"the data set's classes {', '.join(missing)} are not among the model's "
            f"({', '.join(run_classes)}): rename the class folders, or score a model "
            "trained on these classes"
        )
    return np.array([found[c] for c in data_classes], dtype=np.int64)


def evaluate_on(
    trained: TrainedModel,
    dataset: str,
    data_dir: str | None,
    split: str,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the model on ``split`` (test, val, train or all) of another data set, at
    the run's image size, with the run's metrics and 95 % bootstrap intervals."""
    from medbloom.calibration import expected_calibration_error
    from medbloom.data.folders import folder_spec, load_folder_dataset
    from medbloom.data.registry import FOLDER_PREFIX, load_dataset, spec_of
    from medbloom.metrics import (
        BOOTSTRAP_LEVEL,
        BOOTSTRAP_RESAMPLES,
        bootstrap_intervals,
        evaluate_scores,
        per_class_report,
    )

    if split not in ("test", "val", "train", "all"):
        raise ConfigError(f"--split {split!r}: expected test, val, train or all")
    size = trained.spec.image_size
    mine = trained.spec
    folder = dataset.startswith(FOLDER_PREFIX)
    if folder and mine.spatial_dims != 2:
        raise ConfigError(f"--dataset {dataset}: folder sets are 2D, the model is 3D")
    # what the data set is, before any image is decoded: a mismatch is a one-line error
    if folder:
        root = Path(dataset[len(FOLDER_PREFIX) :]).expanduser()
        # any class-folder set, decoded as the run's own images were (channels, crop)
        other = folder_spec(root, name=dataset, image_size=size, channels=mine.in_channels)
    else:
        other = spec_of(dataset, 0)
    if (other.spatial_dims, other.in_channels) != (mine.spatial_dims, mine.in_channels):
        raise ConfigError(
            f"--dataset {dataset}: {other.spatial_dims}D images with {other.in_channels} "
            f"channel(s), and the model takes {mine.spatial_dims}D images with "
            f"{mine.in_channels}"
        )
    if (other.task == MULTI_LABEL) != (mine.task == MULTI_LABEL):
        raise ConfigError(f"--dataset {dataset} is {other.task} and the model is {mine.task}")
    if mine.task == MULTI_LABEL:
        if other.class_names != mine.class_names:
            raise ConfigError(f"--dataset {dataset}: its labels are not the model's")
    else:
        mapping = class_mapping(mine.class_names, other.class_names)
    if folder:
        splits = load_folder_dataset(
            root,
            name=dataset,
            image_size=size,
            channels=mine.in_channels,
            progress=progress,
            crop=trained.crop,
        )
    else:
        spec_of(dataset, size)  # a size the data set is published in
        splits = load_dataset(dataset, size, data_dir, download=False, progress=progress)
    parts = {"test": [splits.test], "val": [splits.val], "train": [splits.train]}.get(
        split, [splits.train, splits.val, splits.test]
    )
    images = np.concatenate([p.images for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    task = mine.task
    if task != MULTI_LABEL:
        labels = mapping[labels.reshape(-1)]
    if not len(images):
        raise ConfigError(f"--dataset {dataset} --split {split}: no images")
    started = time.monotonic()
    probs_list = []
    for start in range(0, len(images), 64):
        probs_list.append(trained.probabilities(to_tensor(images[start : start + 64])))
    probs = np.concatenate(probs_list)
    scores = evaluate_scores(labels, probs, task)
    scores["ece"] = expected_calibration_error(labels, probs, task)
    return {
        "run_dir": str(trained.run_dir),
        "checkpoint": trained.which,
        "round": trained.round,
        "dataset": dataset,
        "split": split,
        "images": int(len(images)),
        "temperature": trained.temperature,
        "class_bias": None if trained.bias is None else [float(b) for b in trained.bias],
        "scores": scores,
        "intervals": bootstrap_intervals(
            labels, probs, task, BOOTSTRAP_RESAMPLES, BOOTSTRAP_LEVEL, seed
        ),
        "per_class": per_class_report(labels, probs, task, trained.spec.class_names),
        "seconds": round(time.monotonic() - started, 3),
    }


def default_evaluation_path(run_dir: Path, dataset: str, split: str) -> Path:
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dataset).strip("_")
    return run_dir / "evaluations" / f"{slug}-{split}.json"
