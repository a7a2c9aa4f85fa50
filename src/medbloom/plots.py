"""Static figures of a run, written into its directory: ``medbloom report RUN_DIR``.

``learning_curves.png`` (accuracy, AUC and loss per round for test, validation and
train, with the published centralized results as dashed lines), ``partition.png``
(hospitals x classes, the number of samples in each cell) and
``confusion_matrix.png`` (the latest round in ``per_class.jsonl``). A run still in
progress or cut short is plotted with the rounds it has. Figures are drawn with
Matplotlib's Agg canvas (no display, no global pyplot state) and written to a
temporary name, then renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medbloom.dashboard import rundir
from medbloom.dashboard.rundir import RunData
from medbloom.errors import MedbloomError

SPLIT_COLORS = {
    "test": "#1f77b4",
    "clean test": "#9467bd",
    "validation": "#ff7f0e",
    "train": "#2ca02c",
}
#: One panel per entry: title, {split: metrics.csv column}, benchmark key.
PANELS: tuple[tuple[str, dict[str, str], str | None], ...] = (
    (
        "Accuracy",
        {
            "test": "accuracy",
            "clean test": "clean_accuracy",
            "validation": "val_accuracy",
            "train": "train_accuracy",
        },
        "acc",
    ),
    ("AUC", {"test": "auc", "clean test": "clean_auc", "validation": "val_auc"}, "auc"),
    ("Loss", {"test": "loss", "validation": "val_loss", "train": "train_loss"}, None),
)
DPI = 110


def write_report(run_dir: Path, status: str | None = None) -> list[Path]:
    """Draw the run's figures into ``run_dir`` and return the files written.

    ``status`` is how the run ended when the caller knows it before ``summary.json``
    says so (a run writes its plots just before its final summary).

    Raises :class:`MedbloomError` if ``run_dir`` is not a run directory or holds
    nothing to plot yet.
    """
    run_dir = Path(run_dir)
    if not rundir.is_run_dir(run_dir):
        expected = ", ".join(rundir.MARKER_FILES)
        raise MedbloomError(
            f"{run_dir}: not a run directory (expected a folder with {expected}, "
            "as `medbloom run` writes)"
        )
    if not os.access(run_dir, os.W_OK):
        raise MedbloomError(f"{run_dir}: not writable, the figures cannot be saved there")
    run = rundir.read_run(run_dir)
    if status is not None:
        run = dataclasses.replace(run, status=status)
    written: list[Path] = []
    if run.metrics:
        written.append(save_figure(learning_curves(run), run_dir / "learning_curves.png"))
    if run.partitions:
        written.append(save_figure(partition_figure(run), run_dir / "partition.png"))
    latest = run.latest_per_class
    if latest is not None and isinstance(latest.get("confusion_matrix"), list):
        written.append(save_figure(confusion_figure(run), run_dir / "confusion_matrix.png"))
    if not written:
        raise MedbloomError(
            f"{run_dir}: nothing to plot yet (no round in metrics.csv, no partitions.json)"
        )
    return written


def _title(run: RunData) -> str:
    parts = [run.name, run.dataset, run.model, run.strategy]
    head = " · ".join(p for p in parts if p)
    return f"{head} — {run.status}, {rundir.round_progress(run)}"


def learning_curves(run: RunData) -> Figure:
    """Accuracy, AUC and loss per round; published results as dashed lines."""
    fig = Figure(figsize=(14, 4.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    rounds = [r["round"] for r in run.metrics]
    size = run.summary.get("image_size") or run.config.get("size")
    refs = {k: v for k, v in run.benchmark.items() if k.endswith(f"-{size}")} or run.benchmark
    clean = run.summary.get("clean_test")
    # a clean split equal to the official one would only draw its line twice
    same_test = isinstance(clean, dict) and not clean.get("left_out")
    for ax, (title, columns, ref_key) in zip(axes, PANELS, strict=True):
        for split, col in columns.items():
            if split == "clean test" and same_test:
                continue
            values = rundir.column(run.metrics, col)
            xs = [x for x, v in zip(rounds, values, strict=True) if v is not None]
            ys = [v for v in values if v is not None]
            if ys:
                ax.plot(xs, ys, marker="o", ms=3.5, lw=1.8, color=SPLIT_COLORS[split], label=split)
        if ref_key:
            for i, (name, ref) in enumerate(sorted(refs.items())):
                if ref_key in ref:
                    ax.axhline(
                        ref[ref_key],
                        ls=(0, (4, 3)),
                        lw=1.0,
                        color=("0.35", "0.6", "0.75", "0.85")[min(i, 3)],
                        label=f"{name} (published)",
                    )
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(_title(run), fontsize=11)
    return fig


def partition_figure(run: RunData) -> Figure:
    """Hospitals x classes, each cell the number of that class's samples there."""
    names = _class_names(run, max(len(p.label_counts) for p in run.partitions))
    counts = np.array(
        [list(p.label_counts) + [0] * (len(names) - len(p.label_counts)) for p in run.partitions],
        dtype=np.int64,
    )[:, : len(names)]
    hospitals = [f"hospital {p.client_id} ({p.total:,})" for p in run.partitions]
    fig = _heatmap(
        counts,
        rows=hospitals,
        cols=names,
        xlabel="class",
        ylabel="",
        title=f"{run.name}: samples per hospital and class ({counts.sum():,} in all)",
    )
    return fig


def confusion_figure(run: RunData) -> Figure:
    """The latest round's confusion matrix on the test split."""
    latest = run.latest_per_class or {}
    matrix = np.array(latest.get("confusion_matrix") or [[0]], dtype=np.int64)
    names = [str(n) for n in latest.get("class_names") or []] or _class_names(run, len(matrix))
    n = min(len(names), len(matrix))
    acc = np.trace(matrix[:n, :n]) / max(int(matrix[:n, :n].sum()), 1)
    return _heatmap(
        matrix[:n, :n],
        rows=names[:n],
        cols=names[:n],
        xlabel="predicted",
        ylabel="true",
        title=f"{run.name}: confusion matrix, round {latest.get('round')}, test split "
        f"(accuracy {acc:.3f})",
    )


def _heatmap(
    values: np.ndarray,
    *,
    rows: Sequence[str],
    cols: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
) -> Figure:
    """A grid of cells colored by value, each with its number; sized to its labels."""
    col_labels = [textwrap.fill(c, 16) for c in cols]
    longest_row = max((len(r) for r in rows), default=1)
    longest_col = max((len(line) for c in col_labels for line in c.split("\n")), default=1)
    tall_labels = max((c.count("\n") + 1 for c in col_labels), default=1)
    rotate = len(cols) * longest_col > 90
    width = min(16.0, max(5.5, 0.75 * len(cols) + 0.075 * longest_row + 2.5))
    height = min(14.0, max(3.0, 0.38 * len(rows) + 0.18 * tall_labels + 1.8))
    if rotate:
        height += 0.06 * longest_col
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    ax: Axes = fig.subplots()
    image = ax.imshow(values, cmap="Blues", aspect="auto")
    top = values.max() if values.size else 0
    if len(rows) * len(cols) <= 400:
        for (i, j), v in np.ndenumerate(values):
            ax.text(
                j,
                i,
                f"{int(v):,}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if v > top / 2 else "black",
            )
    ax.set_xticks(
        range(len(cols)),
        labels=col_labels,
        rotation=35 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor" if rotate else "default",
        fontsize=9,
    )
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="samples")
    return fig


def _class_names(run: RunData, n: int) -> list[str]:
    names = list(run.class_names)
    return (names + [f"class {i}" for i in range(len(names), n)])[: max(n, len(names))]


def save_figure(fig: Figure, path: Path) -> Path:
    """Render with Agg to a temporary file beside ``path``, then rename it into place."""
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
