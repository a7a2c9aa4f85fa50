"""medbloom dashboard: follow runs live, inspect one, compare several.

Start it with ``medbloom dashboard --runs DIR`` or directly::

    streamlit run src/medbloom/dashboard/app.py -- --runs runs

The app only reads run directories (through :mod:`medbloom.dashboard.rundir`); a
run in progress is re-read every few seconds, so its curves grow as rounds end.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import altair as alt
import pandas as pd
import streamlit as st

from medbloom.dashboard import rundir
from medbloom.dashboard.rundir import RunData, RunInfo

log = logging.getLogger("medbloom.dashboard")

#: How often a live run (and an empty runs folder) is re-read.
REFRESH_SECONDS = 5.0
#: Where the runs are when no ``--runs`` is given (tests set it; so may a user).
RUNS_ENV = "MEDBLOOM_RUNS_DIR"
#: Up to this many runs the picker is a list; beyond, a drop-down you can type into.
PICKER_LIST_MAX = 12
#: Runs compared by default beside the selected one (the newest on the same data set).
DEFAULT_COMPARED = 3

SPLIT_COLORS = {
    "test": "#1f77b4",
    "clean test": "#9467bd",
    "validation": "#ff7f0e",
    "train": "#2ca02c",
}
STATUS_COLORS = {
    "running": "blue",
    "starting": "blue",
    "finished": "green",
    "failed": "red",
    "interrupted": "orange",
    "unknown": "gray",
}
#: One chart per entry: title, y-axis title, {split: metrics.csv column}.
CURVES: tuple[tuple[str, str, dict[str, str]], ...] = (
    (
        "Accuracy",
        "accuracy",
        {
            "test": "accuracy",
            "clean test": "clean_accuracy",
            "validation": "val_accuracy",
            "train": "train_accuracy",
        },
    ),
    ("AUC", "AUC", {"test": "auc", "clean test": "clean_auc", "validation": "val_auc"}),
    ("Loss", "loss", {"test": "loss", "validation": "val_loss", "train": "train_loss"}),
)
#: The curves overlaid when comparing runs: (metrics.csv column, title).
COMPARED_CURVES = (
    ("auc", "Test AUC"),
    ("accuracy", "Test accuracy"),
    ("val_auc", "Validation AUC"),
    ("val_accuracy", "Validation accuracy"),
    ("loss", "Test loss"),
    ("train_loss", "Train loss (clients' mean)"),
)
CHART_HEIGHT = 300


# ---------------------------------------------------------------- inputs


def runs_dir_from_args(argv: Sequence[str] | None = None) -> Path:
    """``--runs DIR`` after ``--`` on the ``streamlit run`` line, else $MEDBLOOM_RUNS_DIR,
    else ``runs``.

    Only a command line that names this script is parsed: under a test runner
    ``sys.argv`` belongs to someone else.
    """
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == Path(__file__).name:
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--runs")
        args, _ = parser.parse_known_args(argv[1:])
        if args.runs:
            return Path(args.runs).expanduser()
    return Path(os.environ.get(RUNS_ENV) or "runs").expanduser()


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when the run writes anything: the cache key of :func:`load_run`."""
    out = []
    for name in (
        "summary.json",
        "config.json",
        "partitions.json",
        "metrics.csv",
        "clients.csv",
        "per_class.jsonl",
        "logs/server.log",
    ):
        try:
            st_ = (path / name).stat()
            out.append((name, st_.st_mtime_ns, st_.st_size))
        except OSError:
            out.append((name, 0, -1))
    return tuple(out)


@st.cache_data(max_entries=64, show_spinner=False)
def _cached_run(path: str, signature: tuple[tuple[str, int, int], ...]) -> RunData:
    del signature  # only part of the cache key
    return rundir.read_run(Path(path))


def load_run(path: Path) -> RunData:
    """The run's files, re-read only when one of them changed."""
    return _cached_run(str(path), _signature(path))


# ---------------------------------------------------------------- tables


def metrics_frame(run: RunData) -> pd.DataFrame:
    """metrics.csv as a frame with every known column (NaN where missing)."""
    df = pd.DataFrame(run.metrics)
    for col in ("round", *(c for _, _, cols in CURVES for c in cols.values())):
        if col not in df.columns:
            df[col] = float("nan")
    return df.astype({c: "float64" for c in df.columns if c != "round"})


def curve_frame(run: RunData, columns: Mapping[str, str]) -> pd.DataFrame:
    """Long format (round, split, value) of some metrics.csv columns; gaps dropped."""
    df = metrics_frame(run)
    parts = [
        pd.DataFrame({"round": df["round"], "split": split, "value": df[col]})
        for split, col in columns.items()
    ]
    long = pd.concat(parts, ignore_index=True)
    return long.dropna(subset=["value"])


def results_frame(run: RunData) -> pd.DataFrame:
    """This run's final row and its best row (by validation AUC)."""
    rows: list[dict[str, Any]] = []
    for label, row in (("final", run.final), ("best by val AUC", run.best)):
        if row:
            rows.append(
                {
                    "result": label,
                    "round": int(row.get("round", 0)),
                    "test ACC": row.get("accuracy"),
                    "test AUC": row.get("auc"),
                    "clean test ACC": row.get("clean_accuracy"),
                    "clean test AUC": row.get("clean_auc"),
                    "val ACC": row.get("val_accuracy"),
                    "val AUC": row.get("val_auc"),
                }
            )
    columns = ["result", "round", "test ACC", "test AUC", "clean test ACC", "clean test AUC"]
    columns += ["val ACC", "val AUC"]
    return pd.DataFrame(rows, columns=columns)


def privacy_caption(run: RunData) -> str:
    """The run's privacy guarantee, from summary.json's ``privacy``, in the words of
    the closing lines."""
    from medbloom.privacy import describe

    text = describe(run.summary.get("privacy"))
    return text[0].upper() + text[1:] + "."


def clean_test_caption(run: RunData) -> str:
    """What the clean test split is, from summary.json's ``clean_test``."""
    clean = run.summary.get("clean_test")
    if not isinstance(clean, dict):
        return (
            "Clean test split: not computed for this run (--audit off, or a run from "
            "before the audit): its test scores may count images that also sit in training."
        )
    if not clean.get("left_out"):
        return (
            f"Clean test split: all {clean.get('test_images')} test images; none has a twin "
            f"among the training images (dhash within {clean.get('threshold')} bits)."
        )
    return (
        f"Clean test split: {clean.get('clean_images')} of {clean.get('test_images')} test "
        f"images. {clean.get('left_out')} were left out for a twin among the training "
        f"images ({clean.get('left_out_exact')} with identical pixels, "
        f"{clean.get('left_out_near')} within {clean.get('threshold')} bits of the "
        "perceptual hash); leakage.json lists them. The official split's scores count "
        "those twins, the clean split's do not."
    )


def benchmark_frame(run: RunData) -> pd.DataFrame:
    """The published centralized results for this data set (test split)."""
    return pd.DataFrame(
        [
            {"model": name, "test ACC": ref.get("acc"), "test AUC": ref.get("auc")}
            for name, ref in run.benchmark.items()
        ],
        columns=["model", "test ACC", "test AUC"],
    )


CLIENT_COLUMNS = (
    "round",
    "client_id",
    "node_id",
    "status",
    "num_examples",
    "site_accuracy",
    "site_auc",
    "site_loss",
    "personal_accuracy",
    "personal_balanced_accuracy",
    "val_size",
    "train_loss",
    "train_accuracy",
    "local_val_accuracy",
    "seconds",
    "error",
)


def clients_frame(run: RunData) -> pd.DataFrame:
    """clients.csv with every known column and a ``hospital`` label per row."""
    df = pd.DataFrame(run.clients)
    for col in CLIENT_COLUMNS:
        if col not in df.columns:
            df[col] = None
    df["status"] = df["status"].fillna("").astype(str)
    for col in (
        "train_loss",
        "site_accuracy",
        "site_auc",
        "site_loss",
        "personal_accuracy",
        "personal_balanced_accuracy",
    ):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["hospital"] = [
        hospital_label(c, n) for c, n in zip(df["client_id"], df["node_id"], strict=True)
    ]
    return df


def hospital_label(client_id: Any, node_id: Any = None) -> str:
    """``hospital 3``; a node that failed before it ever answered has no hospital yet."""
    if client_id is not None and not pd.isna(client_id):
        return f"hospital {int(client_id)}"
    return f"node …{str(node_id)[-6:]}" if node_id else "unknown node"


def hospitals_frame(run: RunData) -> pd.DataFrame:
    """One row per hospital: its data and how its rounds went."""
    names = run.class_names
    clients = clients_frame(run)
    rows: list[dict[str, Any]] = []
    for share in run.partitions:
        row: dict[str, Any] = {
            "hospital": share.client_id,
            "train": share.num_train,
            "val": share.num_val,
        }
        for i, count in enumerate(share.label_counts):
            row[names[i] if i < len(names) else f"class {i}"] = count
        mine = clients[clients["client_id"] == share.client_id]
        ok = mine[mine["status"] == "ok"]
        row["rounds ok"] = len(ok)
        row["rounds failed"] = len(mine) - len(ok)
        last_loss = ok["train_loss"].dropna()
        row["last train loss"] = float(last_loss.iloc[-1]) if len(last_loss) else None
        site = ok["site_accuracy"].dropna()
        row["site ACC"] = float(site.iloc[-1]) if len(site) else None
        if personalised(run):
            # the hospital's own model against the global one, on the same images
            for col, name in (
                ("personal_accuracy", "own model ACC"),
                ("personal_balanced_accuracy", "own balanced ACC"),
            ):
                own = ok[col].dropna()
                row[name] = float(own.iloc[-1]) if len(own) else None
        rows.append(row)
    return pd.DataFrame(rows)


def personalised(run: RunData) -> bool:
    """Whether each hospital of ``run`` keeps a model of its own (``--strategy`` local,
    fedper, ditto, fedbn or fedavg-ft)."""
    from medbloom.config import PERSONAL

    return run.config.get("strategy") in PERSONAL


def own_models_frame(run: RunData, clients: pd.DataFrame) -> pd.DataFrame:
    """Per round, each hospital's own model's ACC on its own validation split, and the
    size-weighted mean and the worst hospital from metrics.csv."""
    return _per_hospital_lines(
        run,
        clients,
        "personal_accuracy",
        (
            ("personal_mean_accuracy", "mean (weighted by images)"),
            ("personal_worst_accuracy", "worst hospital"),
        ),
    )


def show_own_models(run: RunData, clients: pd.DataFrame) -> None:
    """Personalised runs: each hospital's own model, beside the global one above."""
    data = own_models_frame(run, clients)
    st.markdown("**Each hospital's own model on its own validation data**")
    if data.empty:
        st.caption("No hospital has scored its own model yet.")
        return
    _hospital_lines_chart(data, "own model ACC")


def config_frame(run: RunData) -> pd.DataFrame:
    """The resolved settings as a two-column table (values as text: types vary)."""
    return pd.DataFrame(
        {"setting": list(run.config), "value": [_text(v) for v in run.config.values()]}
    )


def compare_frame(runs: Sequence[RunData]) -> pd.DataFrame:
    """One row per run: what it is, how far it got, its final and best scores."""
    rows = []
    for r in runs:
        final, best = r.final or {}, r.best or {}
        rows.append(
            {
                "run": r.name,
                "data set": r.dataset,
                "model": r.model,
                "strategy": r.strategy,
                "clients": r.num_clients,
                "partition": _partition_text(r),
                "status": r.status,
                "rounds": rundir.round_progress(r).removeprefix("round "),
                "test ACC": final.get("accuracy"),
                "test AUC": final.get("auc"),
                "best val AUC": best.get("val_auc"),
                "its test AUC": best.get("auc"),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- charts


def line_chart(
    data: pd.DataFrame,
    *,
    title: str,
    y_title: str,
    color: str,
    colors: Mapping[str, str] | None = None,
    legend: Literal["right", "bottom"] | None = None,
    height: int = CHART_HEIGHT,
) -> alt.Chart:
    """Points joined by lines over rounds; y not forced to start at zero.

    ``legend`` is where Vega draws the legend (``"right"``, ``"bottom"``), or None for
    no legend: the caller then shows one shared legend above several charts.
    """
    scale = (
        alt.Scale(domain=list(colors), range=list(colors.values()))
        if colors
        else alt.Scale(scheme="category10")
    )
    return (
        alt.Chart(data, title=title)
        .mark_line(point=alt.OverlayMarkDef(size=30), strokeWidth=2)
        .encode(
            x=alt.X("round:Q", title="round", axis=alt.Axis(format="d", tickMinStep=1)),
            y=alt.Y("value:Q", title=y_title, scale=alt.Scale(zero=False, nice=True)),
            color=alt.Color(
                f"{color}:N",
                scale=scale,
                legend=alt.Legend(
                    orient=legend,
                    title=None,
                    labelLimit=200,
                    rowPadding=0,
                    symbolSize=50,
                    columns=2 if data[color].nunique() > 12 else 1,
                )
                if legend
                else None,
            ),
            tooltip=[
                alt.Tooltip(f"{color}:N"),
                alt.Tooltip("round:Q", format="d"),
                alt.Tooltip("value:Q", format=".4f"),
            ],
        )
        .properties(height=height)
    )


def heatmap(
    data: pd.DataFrame,
    *,
    x: str,
    y: str,
    value: str,
    x_order: Sequence[str],
    y_order: Sequence[str],
    x_title: str,
    y_title: str,
    title: str = "",
    square: bool = False,
) -> alt.LayerChart:
    """Cells colored by ``value`` with the number written in each.

    Rows are a fixed height (so labels never collide); ``square`` cells also fix the
    width, for a confusion matrix: show it with ``width="content"``.
    """
    cell = 28 if len(y_order) <= 20 else 16
    if square:
        cell = max(36, min(72, 560 // max(len(x_order), 1)))
    short = len(x_order) <= 6 and max((len(n) for n in x_order), default=0) <= 14
    base = alt.Chart(data).encode(
        x=alt.X(
            f"{x}:N",
            sort=list(x_order),
            title=x_title,
            axis=alt.Axis(labelAngle=0 if short else -45, labelLimit=170, labelOverlap=False),
        ),
        y=alt.Y(
            f"{y}:N",
            sort=list(y_order),
            title=y_title,
            axis=alt.Axis(labelLimit=200, labelOverlap=False),
        ),
    )
    top = float(data[value].max()) if len(data) else 0.0
    rect = base.mark_rect().encode(
        color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme="blues"), legend=None),
        tooltip=[alt.Tooltip(f"{y}:N"), alt.Tooltip(f"{x}:N"), alt.Tooltip(f"{value}:Q")],
    )
    text = base.mark_text(fontSize=12).encode(
        text=alt.Text(f"{value}:Q", format=","),
        color=alt.condition(alt.datum[value] > top / 2, alt.value("white"), alt.value("black")),
    )
    return alt.LayerChart(
        layer=[rect, text],
        title=title,
        height=alt.Step(cell),
        width=alt.Step(cell) if square else alt.Undefined,
    )


# ---------------------------------------------------------------- sections


def show_status(run: RunData, now: float) -> None:
    """The banner: how the run stands, in a sentence, with any file problems under it."""
    progress = rundir.round_progress(run)
    elapsed = rundir.format_duration(run.elapsed_seconds(now))
    if run.status == "finished":
        st.success(f"**Finished**: {progress}, in {elapsed}.")
    elif run.status == "running":
        st.info(f"**Running**: {progress}, {elapsed} so far.")
    elif run.status == "starting":
        st.info(
            "**Starting**: the run directory exists but no round is recorded yet "
            "(loading data and starting the clients)."
        )
    elif run.status == "failed":
        when = f"after {progress}" if run.rounds_completed is not None else "before round 0"
        st.error(
            f"**Failed** {when}: {run.error or 'no error was recorded'}  \n"
            "What it recorded is below; the server log is under *Config & log*."
        )
    elif run.status == "interrupted":
        when = f"after {progress}" if run.rounds_completed is not None else "before round 0"
        st.warning(f"**Interrupted** {when}: {run.error or 'stopped'}.")
    elif isinstance(run.summary.get("status"), str):
        st.warning(
            f"**Status {run.summary['status']!r}**: not one this dashboard knows "
            f"({', '.join(rundir.STATUSES[:4])}); {progress}."
        )
    else:
        st.warning("**Status unknown**: summary.json is missing its status or unreadable.")
    if run.is_stale(now):
        st.warning(
            f"No file of this run has changed for "
            f"{rundir.format_duration(run.idle_seconds(now))}: its process probably "
            "stopped without recording how it ended (killed, or the machine restarted)."
        )
    for note in run.notes:
        st.caption(f"⚠ {note}")


def show_headline(run: RunData, now: float) -> None:
    """Round, time (spent and left), and the scores that matter, as big numbers."""
    cols = st.columns(5)
    done, planned = run.rounds_completed, run.rounds_planned
    live = run.status in rundir.LIVE_STATUSES
    cols[0].metric("Round", f"{done if done is not None else '—'} / {planned or '—'}")
    eta = run.eta_seconds(now) if live else None
    if eta is None:
        left = None
    elif eta == 0:
        left = "ending soon"
    else:
        left = f"~{rundir.format_duration(eta)} left"
    cols[1].metric(
        "Elapsed",
        rundir.format_duration(run.elapsed_seconds(now)),
        delta=left,
        delta_color="off",
        delta_arrow="off",
        help="Time left: the remaining rounds at the mean pace of the rounds so far.",
    )
    final, best = run.final or {}, run.best or {}
    previous = run.metrics[-2] if len(run.metrics) >= 2 else {}
    for col, key, label in ((cols[2], "auc", "Test AUC"), (cols[3], "accuracy", "Test ACC")):
        value, before = final.get(key), previous.get(key)
        col.metric(
            label,
            _num(value),
            delta=f"{value - before:+.4f}" if value is not None and before is not None else None,
            delta_description=f"since round {previous['round']}" if before is not None else None,
            help="The global model on the official test split, at the latest round.",
        )
    best_round = best.get("round")
    cols[4].metric(
        "Best val AUC",
        _num(best.get("val_auc")),
        delta=f"round {int(best_round)}" if best_round is not None else None,
        delta_color="off",
        delta_arrow="off",
        help="The round whose model scored highest on the validation split (best.pt).",
    )
    if live and planned:
        share = min(1.0, max(0.0, (done or 0) / planned))
        st.progress(share, text=rundir.round_progress(run))


def show_curves(run: RunData) -> None:
    """Accuracy, AUC and loss per round for test, validation and train."""
    if not run.metrics:
        st.info(
            "No round recorded yet: the curves start with round 0 (the initial model) "
            "and grow as each round ends."
        )
        return
    show_legend(SPLIT_COLORS)
    cols = st.columns(len(CURVES))
    for col, (title, y_title, columns) in zip(cols, CURVES, strict=True):
        data = curve_frame(run, columns)
        chart = line_chart(
            data,
            title=title,
            y_title=y_title,
            color="split",
            colors={k: SPLIT_COLORS[k] for k in columns},
        )
        col.altair_chart(chart, width="stretch")
    st.caption(
        "Test: the global model on the official test split; clean test: on its images "
        "without a twin among the training images. Validation: the official "
        "validation split (the best round is chosen on its AUC). Train: the clients' "
        "sample-weighted means during local training."
    )


def show_legend(colors: Mapping[str, str]) -> None:
    """One legend line for the charts below it (each chart then needs none)."""
    items = "".join(
        f'<span style="margin-right:1.4em;white-space:nowrap">'
        f'<span style="color:{color};font-size:1.2em">&#9679;</span> {html.escape(label)}'
        "</span>"
        for label, color in colors.items()
    )
    st.markdown(f'<div style="font-size:0.9em">{items}</div>', unsafe_allow_html=True)


def show_results(run: RunData) -> None:
    """The final and best rows beside the published benchmark."""
    st.subheader("Results", anchor=False)
    table = results_frame(run)
    if table.empty:
        st.info("No result yet: the first row appears after round 0.")
        return
    left, right = st.columns([3, 2])
    with left:
        st.markdown("**This run** (federated)")
        st.dataframe(table, hide_index=True, width="stretch", column_config=_score_columns(table))
    with right:
        bench = benchmark_frame(run)
        if bench.empty:
            st.markdown("**Published**")
            st.caption("No published benchmark is recorded for this data set.")
        else:
            st.markdown("**Published** (centralized)")
            st.dataframe(
                bench, hide_index=True, width="stretch", column_config=_score_columns(bench)
            )
    st.caption(clean_test_caption(run))
    st.caption(privacy_caption(run))
    ref_name, ref = _reference(run)
    final = run.final or {}
    if ref and final.get("auc") is not None and "auc" in ref:
        gap = final["auc"] - ref["auc"]
        st.markdown(
            f"Latest test AUC **{final['auc']:.4f}** is **{abs(gap):.4f} "
            f"{'above' if gap >= 0 else 'below'}** the published {ref_name} "
            f"({ref['auc']:.3f})."
        )
    if run.benchmark:
        source = run.summary.get("benchmark_source") or "MedMNIST v2"
        st.caption(
            f"Published: {source}. A federated model trained on data split across "
            "hospitals is expected to trail centralized training."
        )


def show_hospitals(run: RunData) -> None:
    """Each hospital's data (counts, label mix) and how its rounds went."""
    clients = clients_frame(run)
    if run.partitions:
        sizes = [p.total for p in run.partitions]
        st.markdown(
            f"**{len(sizes)} hospitals**, {sum(sizes):,} training samples "
            f"(each keeps {_local_val(run)} for local validation); "
            f"from {min(sizes):,} to {max(sizes):,} per hospital."
        )
    else:
        st.info("This run has no partitions.json: the hospitals' data is not known.")
    left, right = st.columns(2)
    if run.partitions:
        left.markdown("**Samples per hospital and class**")
        left.altair_chart(partition_chart(run), width="stretch")
    ok = clients[clients["status"] == "ok"].dropna(subset=["train_loss"])
    if not ok.empty:
        chart = line_chart(
            pd.DataFrame(
                {"round": ok["round"], "hospital": ok["hospital"], "value": ok["train_loss"]}
            ),
            title="",
            y_title="train loss",
            color="hospital",
            legend="right" if ok["hospital"].nunique() <= 30 else None,
        )
        right.markdown("**Local train loss per round**")
        right.altair_chart(chart, width="stretch")
    else:
        right.caption("No hospital has reported a round yet (clients.csv is empty).")
    show_sites(run, clients)
    if personalised(run):
        show_own_models(run, clients)
    if run.partitions:
        st.markdown("**Hospitals**")
        st.dataframe(
            hospitals_frame(run),
            hide_index=True,
            width="stretch",
            column_config={
                name: st.column_config.NumberColumn(_shorten(name), help=name, width="small")
                for name in run.class_names
            },
        )
    if clients.empty:
        return
    known = [f"hospital {p.client_id}" for p in run.partitions]
    order = known + [h for h in _hospital_order(clients["hospital"]) if h not in known]
    st.altair_chart(participation_chart(clients, order), width="stretch")
    failed = clients[clients["status"] != "ok"]
    if not failed.empty:
        st.markdown("**Failed replies**")
        cols = [c for c in ("round", "hospital", "node_id", "error") if c in failed]
        st.dataframe(failed[cols], hide_index=True, width="stretch")


def sites_frame(run: RunData, clients: pd.DataFrame) -> pd.DataFrame:
    """Per round, each hospital's ACC of the global model it received (on its own
    validation split), and the worst and median hospital from metrics.csv."""
    return _per_hospital_lines(
        run,
        clients,
        "site_accuracy",
        (("worst_site_accuracy", "worst hospital"), ("median_site_accuracy", "median hospital")),
    )


def _per_hospital_lines(
    run: RunData, clients: pd.DataFrame, column: str, summaries: tuple[tuple[str, str], ...]
) -> pd.DataFrame:
    """Long-form lines: ``column`` of clients.csv per hospital and round, and each
    metrics.csv summary column named in ``summaries`` (column, line label)."""
    ok = clients[clients["status"] == "ok"].dropna(subset=[column])
    parts = [pd.DataFrame({"round": ok["round"], "line": ok["hospital"], "value": ok[column]})]
    metrics = metrics_frame(run)
    for col, name in summaries:
        if col in metrics:
            values = pd.to_numeric(metrics[col], errors="coerce")
            keep = values.notna()
            parts.append(
                pd.DataFrame({"round": metrics["round"][keep], "line": name, "value": values[keep]})
            )
    return pd.concat(parts, ignore_index=True)


def show_sites(run: RunData, clients: pd.DataFrame) -> None:
    """The per-hospital panel: does the shared model work on each hospital's patients?"""
    data = sites_frame(run, clients)
    st.markdown("**The global model on each hospital's own validation data**")
    if data.empty:
        st.caption(
            "No hospital has scored the global model yet (each does so before it trains, "
            "every --site-eval-every rounds; 0 turns it off)."
        )
        return
    last = data[data["round"] == data["round"].max()]
    by_line = dict(zip(last["line"], last["value"], strict=True))
    if "worst hospital" in by_line:
        st.markdown(
            f"Round {int(last['round'].iloc[0])}: worst hospital ACC "
            f"**{by_line['worst hospital']:.3f}**, median {by_line['median hospital']:.3f} "
            "(the global model each sampled hospital received, before it trained)."
        )
    _hospital_lines_chart(data, "site ACC")


def _hospital_lines_chart(data: pd.DataFrame, y_title: str) -> None:
    """One line per hospital (and per summary line) over the rounds; a legend while
    there are at most 30 lines."""
    st.altair_chart(
        line_chart(
            data,
            title="",
            y_title=y_title,
            color="line",
            legend="right" if data["line"].nunique() <= 30 else None,
        ),
        width="stretch",
    )


def partition_chart(run: RunData) -> alt.LayerChart:
    """Hospitals x classes, each cell the number of samples of that class there."""
    names = run.class_names or [
        f"class {i}" for i in range(max(len(p.label_counts) for p in run.partitions))
    ]
    rows = [
        {"hospital": f"hospital {p.client_id}", "class": names[i], "samples": count}
        for p in run.partitions
        for i, count in enumerate(p.label_counts)
        if i < len(names)
    ]
    return heatmap(
        pd.DataFrame(rows, columns=["hospital", "class", "samples"]),
        x="class",
        y="hospital",
        value="samples",
        x_order=names,
        y_order=[f"hospital {p.client_id}" for p in run.partitions],
        x_title="",
        y_title="",
    )


def participation_chart(clients: pd.DataFrame, order: Sequence[str]) -> alt.Chart:
    """Which hospital took part in which round, and whether its reply failed."""
    data = clients[["round", "hospital", "status"]].copy()
    data["status"] = data["status"].where(data["status"] == "ok", "failed")
    return (
        alt.Chart(
            data,
            title=alt.Title(
                "Rounds each hospital took part in",
                subtitle="green: trained; red: its reply failed; blank: not sampled",
            ),
        )
        .mark_rect(stroke="white", strokeWidth=1)
        .encode(
            x=alt.X("round:O", title="round", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("hospital:N", sort=list(order), title=None),
            color=alt.Color(
                "status:N",
                scale=alt.Scale(domain=["ok", "failed"], range=["#4c9a5b", "#d62728"]),
                legend=None,
            ),
            tooltip=["hospital:N", "round:O", "status:N"],
        )
        .properties(height=alt.Step(22 if len(order) <= 30 else 12))
    )


def show_classes(run: RunData) -> None:
    """The latest round's confusion matrix and per-class scores on the test split."""
    latest = run.latest_per_class
    if latest is None:
        st.info(
            "No per-class report in this run (per_class.jsonl): it is written with each "
            "round by recent versions of medbloom."
        )
        return
    names = [str(n) for n in latest.get("class_names") or run.class_names]
    rnd = int(latest.get("round", 0))
    st.markdown(f"**Round {rnd}**, test split")
    matrix = latest.get("confusion_matrix")
    table = pd.DataFrame(
        {
            "class": names,
            **{
                k: _padded(latest.get(k), len(names))
                for k in ("precision", "recall", "f1", "support")
            },
        }
    )
    # A small matrix fits beside its table; a large one gets the page's width.
    left, right = st.columns([3, 2]) if len(names) <= 4 else (st.container(), st.container())
    with left:
        if isinstance(matrix, list) and matrix:
            rows = [
                {"true": names[i], "predicted": names[j], "samples": int(v)}
                for i, line in enumerate(matrix)
                for j, v in enumerate(line)
                if i < len(names) and j < len(names)
            ]
            st.markdown("**Confusion matrix**")
            chart = heatmap(
                pd.DataFrame(rows),
                x="predicted",
                y="true",
                value="samples",
                x_order=names,
                y_order=names,
                x_title="predicted",
                y_title="true",
                square=True,
            )
            st.altair_chart(chart, width="content")
        else:
            st.caption("Multi-label task: no confusion matrix, per-label scores only.")
    with right:
        st.markdown("**Per class**")
        st.dataframe(table, hide_index=True, width="stretch", column_config=_score_columns(table))


def show_config(run: RunData) -> None:
    """The resolved settings, package versions, the command, and the log's tail."""
    if not run.config:
        st.info("This run has no readable config.json.")
    else:
        table = config_frame(run)
        half = (len(table) + 1) // 2
        cols = st.columns([2, 2, 2])
        cols[0].markdown("**Settings**")
        cols[0].dataframe(table.iloc[:half], hide_index=True, width="stretch", height="content")
        cols[1].markdown("&nbsp;")
        cols[1].dataframe(table.iloc[half:], hide_index=True, width="stretch", height="content")
        versions = run.info.get("versions")
        if isinstance(versions, dict) and versions:
            cols[2].markdown("**Package versions**")
            cols[2].dataframe(
                pd.DataFrame(
                    {"package": list(versions), "version": [_text(v) for v in versions.values()]}
                ),
                hide_index=True,
                width="stretch",
                height="content",
            )
        details = [
            f"seed {run.info.get('seed')}" if "seed" in run.info else None,
            f"created {run.info.get('created_at')}" if "created_at" in run.info else None,
            f"on {run.info.get('host')}" if "host" in run.info else None,
        ]
        cols[2].caption(", ".join(d for d in details if d))
        command = run.info.get("command")
        if isinstance(command, list) and command:
            st.markdown("**Command**")
            st.code(shlex.join(_text(c) for c in command), language="bash")
    tail = rundir.log_tail(run.path)
    with st.expander("Server log (last lines)", expanded=run.status == "failed"):
        if tail:
            st.code("\n".join(tail), language="log")
        else:
            st.caption("No logs/server.log yet.")


def show_compare(run: RunData, runs: Sequence[RunInfo]) -> None:
    """Overlay the curves of several runs; a table of where each stands."""
    others = [r for r in runs if r.path != run.path]
    if not others:
        st.info("Only one run in this folder: start another to compare them here.")
        return
    labels = {str(r.path): r.label for r in others}
    if "compare" not in st.session_state:
        same = [str(r.path) for r in others if r.dataset == run.dataset]
        st.session_state["compare"] = same[:DEFAULT_COMPARED]
    st.multiselect(
        "Compare with",
        options=list(labels),
        format_func=lambda p: labels.get(p, Path(p).name),
        key="compare",
        placeholder="Pick runs to overlay on this one",
    )
    chosen = [run] + [load_run(Path(p)) for p in st.session_state["compare"] if p in labels]
    table = compare_frame(chosen)
    shared = [
        c
        for c in ("data set", "model", "partition", "strategy", "clients")
        if len(table) > 1 and table[c].nunique(dropna=False) == 1
    ]
    if shared:
        st.caption("All these runs: " + " · ".join(_text(table[c].iloc[0]) for c in shared))
    table = table.drop(columns=shared)
    st.dataframe(table, hide_index=True, width="stretch", column_config=_score_columns(table))
    frames = []
    for r in chosen:
        df = metrics_frame(r)
        df["run"] = r.name
        frames.append(df)
    data = pd.concat(frames, ignore_index=True)
    if data.empty:
        st.info("None of these runs has recorded a round yet.")
        return
    palette = dict(zip([r.name for r in chosen], _category10(len(chosen)), strict=True))
    show_legend(palette)
    cols = st.columns(3)
    for i, (col_name, title) in enumerate(COMPARED_CURVES):
        sub = pd.DataFrame(
            {"round": data["round"], "run": data["run"], "value": data[col_name]}
        ).dropna(subset=["value"])
        chart = line_chart(sub, title=title, y_title="", color="run", colors=palette)
        cols[i % 3].altair_chart(chart, width="stretch")


# ---------------------------------------------------------------- pages


def render_run(path: str, runs: Sequence[RunInfo], watched: Sequence[str] = ()) -> None:
    """Everything about one run; re-run on a timer while a shown run is live.

    ``watched`` are the shown runs that were live when the timer was set: once one
    of them ends, the whole app reruns, so the picker shows the new status and the
    timer stops if nothing shown is live any more.
    """
    now = time.time()
    run = load_run(Path(path))
    if any(load_run(Path(p)).status not in rundir.LIVE_STATUSES for p in watched):
        st.rerun()
    try:
        st.header(run.name, anchor=False)
        st.caption(_describe(run))
        show_status(run, now)
        show_headline(run, now)
        curves, hospitals, classes, compare, config = st.tabs(
            ["Learning curves", "Hospitals", "Per class", "Compare runs", "Config & log"]
        )
        with curves:
            show_curves(run)
            show_results(run)
        with hospitals:
            show_hospitals(run)
        with classes:
            show_classes(run)
        with compare:
            show_compare(run, runs)
        with config:
            show_config(run)
    except Exception as exc:  # the last guard: a message in the page, never a traceback
        log.exception("dashboard: cannot show %s", path)
        st.error(
            f"Cannot show {Path(path).name}: {type(exc).__name__}: {exc}. "
            "Its files may be from another version of medbloom."
        )


def wait_for_runs(runs_dir: Path) -> None:
    """Re-check the folder on a timer; reload the app when the first run appears."""
    if rundir.list_runs(runs_dir):
        st.rerun()


def sidebar(runs_dir: Path, runs: Sequence[RunInfo]) -> tuple[str | None, bool]:
    """The run picker (newest first); returns the chosen run and whether to refresh."""
    st.sidebar.title("medbloom")
    st.sidebar.caption(f"Runs in `{runs_dir}`")
    if not runs:
        return None, True
    paths = [str(r.path) for r in runs]
    by_path = {str(r.path): r for r in runs}
    if len(runs) <= PICKER_LIST_MAX:
        choice = st.sidebar.radio(
            "Run (newest first)",
            options=paths,
            format_func=lambda p: by_path[p].name,
            captions=[_picker_caption(r) for r in runs],
            key="run",
        )
    else:  # a long list: a drop-down you can type into
        choice = st.sidebar.selectbox(
            f"Run (newest first, {len(runs)} in all)",
            options=paths,
            format_func=lambda p: by_path[p].label,
            key="run",
        )
        if choice in by_path:
            st.sidebar.caption(_picker_caption(by_path[choice]))
    live = st.sidebar.toggle(
        f"Refresh live runs every {REFRESH_SECONDS:g} s", value=True, key="live"
    )
    st.sidebar.button("Reload the list of runs", width="stretch")
    return choice, live


def main() -> None:
    """The page: a picker on the left, the chosen run on the right."""
    st.set_page_config(page_title="medbloom dashboard", page_icon="🌸", layout="wide")
    # Streamlit leaves 6rem above the page for its toolbar; a dashboard wants the room.
    st.html(
        "<style>[data-testid='stMainBlockContainer']{padding-top:2.5rem}"
        "[data-testid='stSidebarUserContent']{padding-top:1rem}</style>"
    )
    runs_dir = runs_dir_from_args()
    try:
        runs = rundir.list_runs(runs_dir)
        choice, live = sidebar(runs_dir, runs)
    except Exception as exc:  # never a traceback in the page
        log.exception("dashboard: cannot list %s", runs_dir)
        st.error(f"Cannot list the runs in {runs_dir}: {type(exc).__name__}: {exc}")
        return
    if choice is None:
        st.title("medbloom dashboard")
        if not _exists(runs_dir):
            st.info(f"No runs yet: {runs_dir} does not exist.")
        else:
            st.info(f"No runs yet in {runs_dir}.")
        st.markdown(
            f"Start one with `medbloom run --out {runs_dir}/NAME` (or `medbloom run` "
            "in the folder that holds `runs/`); it appears here on its own."
        )
        st.fragment(wait_for_runs, run_every=REFRESH_SECONDS)(runs_dir)
        return
    compared = set(st.session_state.get("compare") or [])
    watched = [
        str(r.path)
        for r in runs
        if (str(r.path) == choice or str(r.path) in compared) and r.status in rundir.LIVE_STATUSES
    ]
    every = REFRESH_SECONDS if live and watched else None
    st.fragment(render_run, run_every=every)(choice, runs, watched if every else ())


# ---------------------------------------------------------------- helpers


def _reference(run: RunData) -> tuple[str, dict[str, float] | None]:
    """The published result to compare against: ResNet-18 at this run's image size,
    else the first one recorded."""
    bench = run.benchmark
    if not bench:
        return "", None
    size = run.summary.get("image_size") or run.config.get("size")
    name = f"resnet18-{size}"
    if name in bench:
        return name, bench[name]
    first = next(iter(bench))
    return first, bench[first]


def _describe(run: RunData) -> str:
    cfg = run.config
    parts = [
        run.dataset,
        f"{cfg['size']} px" if "size" in cfg else None,
        run.model,
        run.strategy,
        f"{run.num_clients} hospitals" if run.num_clients is not None else None,
        _partition_text(run),
    ]
    return " · ".join(p for p in parts if p) + f"  \n`{run.path}`"


def _partition_text(run: RunData) -> str | None:
    cfg = run.config
    kind = cfg.get("partition")
    if kind == "dirichlet":
        return f"dirichlet α={cfg.get('alpha')}"
    if kind == "pathological":
        return f"pathological, {cfg.get('classes-per-client')} classes each"
    return str(kind) if kind else None


def _picker_caption(r: RunInfo) -> str:
    parts = [r.dataset, r.strategy, f"{r.num_clients} clients" if r.num_clients else None]
    color = STATUS_COLORS.get(r.status, "gray")
    text = " · ".join(p for p in parts if p)
    return f"{text} · :{color}[{r.status}]" if text else f":{color}[{r.status}]"


def _local_val(run: RunData) -> str:
    share = run.config.get("local-val-fraction")
    return f"{float(share):.0%}" if isinstance(share, (int, float)) else "a share"


def _hospital_order(labels: pd.Series) -> list[str]:
    def key(label: str) -> tuple[int, int | str]:
        tail = label.rsplit(" ", 1)[-1]
        return (0, int(tail)) if label.startswith("hospital") and tail.isdigit() else (1, label)

    return sorted(set(labels), key=key)


def _score_columns(table: pd.DataFrame) -> dict[str, Any]:
    scores = {
        "test ACC",
        "test AUC",
        "clean test ACC",
        "clean test AUC",
        "val ACC",
        "val AUC",
        "precision",
        "recall",
        "f1",
        "best val AUC",
        "its test AUC",
    }
    return {c: st.column_config.NumberColumn(format="%.4f") for c in table.columns if c in scores}


def _category10(n: int) -> list[str]:
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    return [palette[i % len(palette)] for i in range(n)]


def _shorten(name: str, limit: int = 14) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _padded(values: Any, n: int) -> list[Any]:
    values = list(values) if isinstance(values, list) else []
    return (values + [None] * n)[:n]


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "—"


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _text(value: Any) -> str:
    return "" if value is None else str(value)


if __name__ == "__main__":
    main()
