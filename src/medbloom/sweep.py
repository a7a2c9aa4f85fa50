"""Sweeps: every experiment of a grid over experiment options, resumable, compared.

A sweep file (TOML) holds fixed settings and a grid::

    [sweep]
    name = "pneumonia-strategies"     # optional; names the default output folder
    out = "sweeps/pneumonia"          # optional; --out overrides it

    [base]                            # every experiment: any `medbloom run` option
    dataset = "pneumoniamnist"
    rounds = 20

    [grid]                            # every combination of these values
    strategy = ["fedavg", "fedprox"]
    alpha = [0.1, 0.5]
    seed = [0, 1, 2]

Each experiment is a `medbloom run` in its own process, with its run directory under
``OUT/runs/``; one that finished is not run again, one that was stopped or killed is
resumed from its last checkpoint, so a killed sweep goes on where it was. Experiments
run one after another, ``--parallel N`` at a time, or as tasks on an existing Ray
cluster (``--ray-address``). ``OUT/sweep.csv`` has one row per experiment,
``OUT/comparison.md`` the mean and standard deviation over seeds of each other grid
point, and ``OUT/sweep.png`` the same as bars.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medbloom.config import ExperimentConfig
from medbloom.data.registry import spec_of
from medbloom.errors import ConfigError, MedbloomError
from medbloom.experiment import absolute_paths, partitions_for
from medbloom.runs import atomic_write_json, atomic_write_text, jsonable

SECTIONS = ("sweep", "base", "grid")
# the scores sweep.csv takes from each experiment's summary.json
SCORES = ("accuracy", "auc", "f1", "clean_accuracy")
COMPARED = (
    ("accuracy", "test ACC"),
    ("clean_accuracy", "clean test ACC"),
    ("auc", "test AUC"),
    ("worst_site_accuracy", "worst-site ACC"),
    ("personal_mean_accuracy", "site ACC, mean"),
    ("personal_worst_accuracy", "site ACC, worst"),
    ("personal_mean_balanced_accuracy", "site balanced ACC, mean"),
    ("personal_worst_balanced_accuracy", "site balanced ACC, worst"),
)
# scores of the hospitals' own validation splits, from the last row that has them
SITE_SCORES = (
    "worst_site_accuracy",
    "personal_mean_accuracy",
    "personal_worst_accuracy",
    "personal_mean_balanced_accuracy",
    "personal_worst_balanced_accuracy",
)


@dataclass(frozen=True)
class Experiment:
    """One point of the grid: its folder name, its grid values, its whole config."""

    id: str
    point: dict[str, Any]
    config: dict[str, Any]

    def run_dir(self, out: Path) -> Path:
        return out / "runs" / self.id


@dataclass(frozen=True)
class Sweep:
    name: str
    out: Path
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    experiments: list[Experiment]

    def spec(self) -> dict[str, Any]:
        """What makes two sweeps the same sweep (sweep.json)."""
        return {"name": self.name, "base": self.base, "grid": self.grid}


def _knob_names() -> set[str]:
    return {ExperimentConfig.flag(f.name) for f in ExperimentConfig.knobs()}


def _check_keys(table: dict[str, Any], where: str, source: str) -> dict[str, Any]:
    known = _knob_names()
    out = {}
    for key, value in table.items():
        name = ExperimentConfig.flag(str(key))
        if name == "out":
            raise ConfigError(f"{source}: [{where}] out: each experiment's folder is the sweep's")
        if name not in known:
            raise ConfigError(
                f"{source}: [{where}] {key!r} is not an experiment option "
                "(see `medbloom run --help`)"
            )
        out[name] = value
    return out


def _label(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_") or "_"


@contextlib.contextmanager
def _named(source: str) -> Iterator[None]:
    """A user's error, as a one-line ConfigError that starts with ``source``."""
    try:
        yield
    except MedbloomError as exc:
        message = str(exc)
        raise ConfigError(
            message if message.startswith(source) else f"{source}: {message}"
        ) from None


def load_sweep(path: str | Path, out: str | None = None) -> Sweep:
    """Read and check a sweep file; every experiment's config, data set name and
    partition is checked here, so a bad sweep fails (ConfigError or DataError, exit 2)
    before anything is written or run."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {p}: not valid TOML: {exc}") from None
    extra = sorted(set(data) - set(SECTIONS))
    if extra:
        raise ConfigError(
            f"{p}: unknown table(s) {', '.join(extra)}; expected [sweep], [base], [grid]"
        )
    for section in SECTIONS:
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"{p}: [{section}] must be a table")
    meta = data.get("sweep", {})
    unknown_meta = sorted(set(meta) - {"name", "out"})
    if unknown_meta:
        raise ConfigError(f"{p}: [sweep] {', '.join(unknown_meta)}: expected name and out only")
    base = _check_keys(data.get("base", {}), "base", str(p))
    grid_raw = _check_keys(data.get("grid", {}), "grid", str(p))
    if not grid_raw:
        raise ConfigError(f"{p}: the grid is empty; give [grid] at least one option with values")
    grid: dict[str, list[Any]] = {}
    for key, values in grid_raw.items():
        if not isinstance(values, list):
            raise ConfigError(f"{p}: [grid] {key} = {values!r}: expected a list of values")
        if not values:
            raise ConfigError(f"{p}: [grid] {key} is empty: give it at least one value")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{p}: [grid] {key} lists a value twice: {values!r}")
        if key in base:
            raise ConfigError(f"{p}: {key} is in both [base] and [grid]")
        grid[key] = values
    name = str(meta.get("name") or p.stem)
    experiments = []
    checked: list[ExperimentConfig] = []  # each experiment's validated config
    keys = list(grid)
    for i, combo in enumerate(itertools.product(*(grid[k] for k in keys)), start=1):
        point = dict(zip(keys, combo, strict=True))
        exp_id = f"{i:03d}-" + "-".join(f"{k}={_label(v)}" for k, v in point.items())
        source = f"{p}: experiment {exp_id}"
        # wrong types, unknown choices and values out of range, named with the experiment
        with _named(source):
            cfg = ExperimentConfig.from_mapping({**base, **point}, source).validate()
        # paths as this machine resolves them: experiments run from other folders (and
        # on a Ray cluster, on other machines)
        paths = absolute_paths(cfg)
        config = {**base, **point, **{ExperimentConfig.flag(k): v for k, v in paths.items()}}
        experiments.append(Experiment(exp_id, point, config))
        checked.append(cfg.replace(**paths))
    for exp, cfg in zip(experiments, checked, strict=True):
        with _named(f"{p}: experiment {exp.id}"):
            spec_of(cfg.dataset, cfg.size)  # an unknown data set name, without decoding
            # an impossible partition (say Dirichlet 0.1 over 10 hospitals of a 2-class
            # set), from the labels: each data set is read (fetched) once, here
            partitions_for(cfg)
    # the same command finds the same folder again: that is how a sweep goes on
    folder = out or meta.get("out") or Path("sweeps", _label(name))
    return Sweep(name, Path(str(folder)).expanduser().absolute(), base, grid, experiments)


# --------------------------------------------------------------------------- state
def _summary(run_dir: Path) -> dict[str, Any]:
    """The experiment's summary.json, or ``{}`` while it has none (or a corrupt one)."""
    from medbloom.dashboard.rundir import read_json

    return read_json(run_dir / "summary.json")[0]


def experiment_status(run_dir: Path) -> str:
    """``finished``, ``resumable`` (a checkpoint to go on from), ``partial`` (a run
    directory without one) or ``new``."""
    if _summary(run_dir).get("status") == "finished":
        return "finished"
    if (run_dir / "checkpoints" / "latest.pt").is_file():
        return "resumable"
    return "partial" if run_dir.exists() else "new"


def _command(exp: Experiment, out: Path) -> list[str]:
    run_dir = exp.run_dir(out)
    status = experiment_status(run_dir)
    if status == "resumable":
        return ["-m", "medbloom", "run", "--resume", str(run_dir)]
    if status == "partial":
        shutil.rmtree(run_dir)  # ours, and nothing in it to go on from
    config_file = out / "configs" / f"{exp.id}.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_file, exp.config)
    return ["-m", "medbloom", "run", "--config", str(config_file), "--out", str(run_dir)]


def _child_env() -> dict[str, str]:
    # Each experiment's simulation starts a Ray instance of its own (Flower's ray.init,
    # see federation/simulation.py): never the cluster a sweep task runs in.
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


_CHILDREN: set[subprocess.Popen[bytes]] = set()
_CHILDREN_LOCK = threading.Lock()
# Set by stop_experiments: an experiment a worker thread starts after it (the sweep was
# stopped between two experiments) is stopped too, instead of running to its end while
# the sweep waits for it.
_STOPPING = threading.Event()
STOPPED_BEFORE_START = 130


def run_experiment(args: list[str], log_file: str) -> int:
    """Run one experiment's `python -m medbloom run ARGS` with this process's Python (on
    a Ray cluster: the node's); its output goes to ``log_file``.

    The experiment runs in a session of its own, so a terminal's Ctrl-C reaches the
    sweep only, which passes one SIGINT on (:func:`stop_experiments`): the experiment
    then stops after its current step and can be resumed. Interrupted here (a Ray task
    cancelled), it is stopped the same way before this returns.
    """
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *args]
    if _STOPPING.is_set():
        return STOPPED_BEFORE_START
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True
        )
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc)
            stopping = _STOPPING.is_set()
        if stopping:  # asked to stop while it was starting: stop it as the others
            proc.send_signal(signal.SIGINT)
        try:
            return proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)


def stop_experiments() -> None:
    """Ask every experiment this process started, or starts from now on, to stop (one
    SIGINT each)."""
    _STOPPING.set()
    with _CHILDREN_LOCK:
        running = [p for p in _CHILDREN if p.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGINT)


def _run_local(
    jobs: list[tuple[Experiment, list[str], str]],
    parallel: int,
    report: Callable[[Experiment, int], None],
) -> None:
    _STOPPING.clear()
    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        futures = {pool.submit(run_experiment, cmd, log): exp for exp, cmd, log in jobs}
        for future in as_completed(futures):
            report(futures[future], future.result())
    except BaseException:
        stop_experiments()  # the running ones stop after their current step...
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # ...and the queued ones never start


def _connect_ray(address: str) -> None:
    """Join the Ray cluster at ``address`` (``HOST:PORT`` of its GCS, ``ray://HOST:PORT``
    or ``auto``). Ray itself retries an unreachable address for minutes: a plain TCP
    connection tells first."""
    import socket

    import ray

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address != "auto":
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise MedbloomError(
                f"--ray-address {address}: cannot connect to Ray: {exc} "
                "(expected HOST:PORT of a running cluster's head, e.g. from `ray start --head`)"
            ) from None
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            # Ray hides GPUs from a task that asks for none; the experiment's own
            # simulation decides what it uses
            runtime_env={"env_vars": {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}},
        )
    except Exception as exc:  # ray raises ConnectionError, RuntimeError, ValueError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedbloomError(f"--ray-address {address}: cannot connect to Ray: {first}") from None


def _run_ray(
    jobs: list[tuple[Experiment, list[str], str]], report: Callable[[Experiment, int], None]
) -> None:
    """Each experiment as a Ray task on the connected cluster. A task reserves as many
    CPUs as the smallest node has, so a node runs one experiment at a time (each
    experiment's simulation uses every core of its node). Every node needs medbloom
    installed and must see the sweep folder and the data at the same paths."""
    import ray
    from ray.exceptions import RayError

    try:
        nodes = ray.nodes()  # type: ignore[no-untyped-call]
        cpus = min(
            (float(n["Resources"].get("CPU", 1.0)) for n in nodes if n.get("Alive")), default=1.0
        )
        task = ray.remote(num_cpus=max(cpus, 1.0), max_retries=0)(run_experiment)
        pending = {task.remote(cmd, log): exp for exp, cmd, log in jobs}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                exp = pending.pop(ready[0])
                try:
                    code = int(ray.get(ready[0]))
                except RayError as exc:  # a lost node, a worker that died
                    print(f"{exp.id}: Ray task failed: {str(exc).splitlines()[0]}", file=sys.stderr)
                    code = -1
                report(exp, code)
        except BaseException:
            for ref in pending:  # running tasks stop their experiment (see run_experiment)
                ray.cancel(ref)
            ray.wait(list(pending), num_returns=len(pending), timeout=120)
            raise
    finally:
        ray.shutdown()


def run_sweep(
    sweep: Sweep,
    parallel: int = 1,
    ray_address: str | None = None,
    stream: Any = sys.stdout,
) -> int:
    """Run every experiment not yet finished; write sweep.csv, comparison.md and
    sweep.png. Returns 0 when every experiment has finished, else 1."""
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: expected an integer >= 1")
    out = sweep.out
    spec_file = out / "sweep.json"
    record = jsonable(
        {"spec": sweep.spec(), "experiments": [{"id": e.id, **e.point} for e in sweep.experiments]}
    )
    if spec_file.is_file():
        # the same settings and the same experiment folders (the grid in the same order)
        if json.loads(spec_file.read_text()) != json.loads(json.dumps(record)):
            raise ConfigError(
                f"{out} holds another sweep (its sweep.json differs); give a new --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not a sweep folder; give a new --out")
    if ray_address:
        _connect_ray(ray_address)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    with _sweep_lock(out):
        atomic_write_json(spec_file, record)
        return _run_all(sweep, parallel, ray_address, stream)


@contextlib.contextmanager
def _sweep_lock(out: Path) -> Iterator[None]:
    """One sweep at a time in a folder: two would resume the same experiment twice."""
    import fcntl

    with open(out / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another sweep is running in {out}; wait for it or stop it"
            ) from None
        yield


def _run_all(sweep: Sweep, parallel: int, ray_address: str | None, stream: Any) -> int:
    out = sweep.out
    todo = [e for e in sweep.experiments if experiment_status(e.run_dir(out)) != "finished"]
    print(
        f"sweep {sweep.name}: {len(sweep.experiments)} experiments, "
        f"{len(sweep.experiments) - len(todo)} finished, {len(todo)} to run "
        f"({'Ray at ' + ray_address if ray_address else f'{parallel} at a time'}); {out}",
        file=stream,
        flush=True,
    )
    started = time.monotonic()
    count = [0]

    def report(exp: Experiment, code: int) -> None:
        count[0] += 1
        status = experiment_status(exp.run_dir(out))
        print(
            f"[{count[0]}/{len(todo)}] {exp.id}: {status if code == 0 else f'exit {code}'} "
            f"({time.monotonic() - started:.0f} s)",
            file=stream,
            flush=True,
        )
        write_results(sweep)

    jobs = [(e, _command(e, out), str(out / "logs" / f"{e.id}.log")) for e in todo]
    try:
        if ray_address:
            _run_ray(jobs, report)
        else:
            _run_local(jobs, parallel, report)
    finally:
        rows = write_results(sweep)
    print(comparison_table(sweep, rows), file=stream)
    unfinished = [r["id"] for r in rows if r["status"] != "finished"]
    if unfinished:
        print(f"not finished: {', '.join(unfinished)} (run the sweep again to go on)", file=stream)
    return 1 if unfinished else 0


# --------------------------------------------------------------------------- results
def _last_site_scores(run_dir: Path) -> dict[str, float]:
    """:data:`SITE_SCORES` the last time the hospitals scored their models (metrics.csv;
    with --site-eval-every N not every row has them): the worst hospital's ACC of the
    global model, and of the model each hospital uses (``personal_*``)."""
    from medbloom.runs import read_metrics

    rows = read_metrics(run_dir) if (run_dir / "metrics.csv").is_file() else []
    out = {}
    for key in SITE_SCORES:
        out[key] = float("nan")
        for row in reversed(rows):
            value = row.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                out[key] = float(value)
                break
    return out


def result_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per experiment: its grid values, status, final test scores and the
    worst hospital's ACC of the last global model the hospitals scored."""
    rows = []
    for exp in sweep.experiments:
        summary = _summary(exp.run_dir(sweep.out))
        final = summary.get("final") or {}
        row: dict[str, Any] = {"id": exp.id, **exp.point}
        row["status"] = summary.get("status", "not started")
        row["rounds_completed"] = summary.get("rounds_completed")
        for key in SCORES:
            value = final.get(key)
            row[key] = float(value) if isinstance(value, int | float) else float("nan")
        row.update(_last_site_scores(exp.run_dir(sweep.out)))
        # the privacy the run spent (the largest over its hospitals); NaN: none
        privacy = summary.get("privacy") or {}
        eps = privacy.get("epsilon")
        row["epsilon"] = float(eps) if isinstance(eps, int | float) else float("nan")
        row["wall_seconds"] = summary.get("wall_seconds")
        row["run_dir"] = str(exp.run_dir(sweep.out))
        rows.append(row)
    return rows


def grouped(sweep: Sweep, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished experiments grouped by their grid values other than the seed, with the
    mean and standard deviation (over seeds) of each compared score."""
    keys = [k for k in sweep.grid if k != "seed"]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), [])
        if row["status"] == "finished":
            groups[tuple(row[k] for k in keys)].append(row)
    out = []
    for values, members in groups.items():
        entry: dict[str, Any] = dict(zip(keys, values, strict=True))
        entry["n"] = len(members)
        for key, _ in COMPARED:
            xs = [m[key] for m in members if math.isfinite(m[key])]
            entry[f"{key}_mean"] = statistics.fmean(xs) if xs else float("nan")
            entry[f"{key}_std"] = statistics.stdev(xs) if len(xs) > 1 else float("nan")
        out.append(entry)
    return out


def comparison_table(sweep: Sweep, rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per grid point (seeds pooled), mean +/- std of the final scores."""
    keys = [k for k in sweep.grid if k != "seed"]
    seeds = len(sweep.grid.get("seed", [sweep.base.get("seed", 42)]))
    head = [*keys, "runs", *(f"{label} (mean +/- std)" for _, label in COMPARED)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in grouped(sweep, rows):
        cells = [str(g[k]) for k in keys] + [f"{g['n']}/{seeds}"]
        for key, _ in COMPARED:
            mean, std = g[f"{key}_mean"], g[f"{key}_std"]
            cells.append(
                "-"
                if math.isnan(mean)
                else f"{mean:.3f}" + ("" if math.isnan(std) else f" +/- {std:.3f}")
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(sweep: Sweep) -> list[dict[str, Any]]:
    """sweep.csv, comparison.md and sweep.png from the experiments' summaries."""
    import csv
    import io

    rows = result_rows(sweep)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        )
    atomic_write_text(sweep.out / "sweep.csv", buf.getvalue())
    atomic_write_text(sweep.out / "comparison.md", comparison_table(sweep, rows) + "\n")
    try:
        _plot(sweep, rows, sweep.out / "sweep.png")
    except Exception as exc:  # a plot must never cost the results
        print(f"medbloom: could not draw sweep.png: {exc}", file=sys.stderr)
    return rows


def _plot(sweep: Sweep, rows: Sequence[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    from medbloom.plots import save_figure

    groups = grouped(sweep, rows)
    keys = [k for k in sweep.grid if k != "seed"]
    labels = ["\n".join(f"{k}={g[k]}" for k in keys) or "all" for g in groups]
    width = max(6.0, 0.5 * len(groups)) * len(COMPARED) / 2
    fig = Figure(figsize=(width, 4.5), layout="constrained")
    axes = fig.subplots(1, len(COMPARED), squeeze=False)[0]
    for ax, (key, title) in zip(axes, COMPARED, strict=True):
        means = [g[f"{key}_mean"] for g in groups]
        stds = [0.0 if math.isnan(g[f"{key}_std"]) else g[f"{key}_std"] for g in groups]
        ax.bar(range(len(groups)), means, yerr=stds, capsize=3, color="#4c78a8")
        ax.set_xticks(range(len(groups)), labels, rotation=90 if len(groups) > 6 else 0, fontsize=7)
        ax.set_title(f"final {title}", fontsize=9)
        spans = [(m - e, m + e) for m, e in zip(means, stds, strict=True) if math.isfinite(m)]
        if spans:
            low, high = min(lo for lo, _ in spans), max(hi for _, hi in spans)
            ax.set_ylim(max(0.0, low - 0.05), min(1.0, high + 0.05))
    fig.suptitle(f"sweep {sweep.name}: mean +/- std over seeds", fontsize=10)
    save_figure(fig, path)
