"""The ``medbloom`` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from medbloom import __version__
from medbloom.config import DUP_THRESHOLD, ExperimentConfig, load_config_file
from medbloom.errors import ConfigError, MedbloomError

EPILOG = "Errors you can fix exit with code 2 and a one-line message."


# Other names a flag answers to (the Brain Tumor MRI step calls the size --image-size).
ALIASES = {"size": ("--image-size",)}
# Flags that mean a value when given alone (--secure-aggregation: on).
BARE = {"secure_aggregation": "on"}


def _add_experiment_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", help="TOML or JSON file of settings (flags override it)"
    )
    for f in ExperimentConfig.knobs():
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        choices = f.metadata.get("choices")
        # The choices go into the help text, not argparse's `choices=`, so that a bad
        # value gets medbloom's one-line error naming what was expected.
        listed = f"; one of: {', '.join(choices)}" if choices else ""
        bare: dict[str, Any] = {"nargs": "?", "const": BARE[f.name]} if f.name in BARE else {}
        p.add_argument(
            f"--{ExperimentConfig.flag(f.name)}",
            *ALIASES.get(f.name, ()),
            dest=f.name,
            type={"int": int, "float": float, "str": str}[kind],
            default=None,
            metavar=kind.upper(),
            help=f"{f.metadata['help']}{listed} (default: {f.default!r})",
            **bare,
        )


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Defaults < --config file < flags."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        from_file = {k.replace("-", "_"): v for k, v in load_config_file(args.config).items()}
        # the file is checked on its own too: a bad value in it is an error even where a
        # flag overrides it (the file is meant to be reused, and would fail without the flag)
        ExperimentConfig.from_mapping(from_file, args.config).validate(source=args.config)
        values.update(from_file)
    for f in ExperimentConfig.knobs():
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return ExperimentConfig.from_mapping(values, args.config or "command line").validate()


class Progress:
    """One line per round: where the run is, its latest and best scores, time left."""

    def __init__(self, rounds: int, stream: Any = sys.stdout) -> None:
        self.rounds = rounds
        self.stream = stream
        self.t0 = time.monotonic()

    def __call__(self, row: dict[str, Any]) -> None:
        r = int(row["round"])
        elapsed = time.monotonic() - self.t0
        left = ""
        if r > 0:
            per_round = row["elapsed_seconds"] / r
            left = f"  {per_round:5.1f} s/round  ~{_duration(per_round * (self.rounds - r))} left"
        best = row.get("best") or {}
        if _finite(row.get("accuracy")):
            scores = (
                f"acc {row['accuracy']:.4f}  auc {row['auc']:.4f}  val auc {row['val_auc']:.4f}"
            )
        else:
            scores = "no global model"
        if _finite(row.get("personal_mean_accuracy")):
            scores += (
                f"  site acc {row['personal_mean_accuracy']:.4f}"
                f" (worst {row['personal_worst_accuracy']:.4f})"
            )
        print(
            f"round {r:>3}/{self.rounds}  {scores}"
            + (f"  best val auc {best['val_auc']:.4f} (round {best['round']})" if best else "")
            + f"  [{_duration(elapsed)}]{left}",
            file=self.stream,
            flush=True,
        )


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Ctrl-C or SIGTERM asks the run to stop cleanly (the engine and Ray shut down,
    the run directory says ``interrupted``); a second Ctrl-C stops at once."""
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print(
            "\nmedbloom: stopping after the current step (Ctrl-C again to force)",
            file=sys.stderr,
            flush=True,
        )
        stop.set()
        _STOPPING.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resumable_run(args: argparse.Namespace) -> tuple[Path, ExperimentConfig]:
    """The run directory and config of ``--resume RUN_DIR``; other experiment flags
    are refused, since a resumed run must be the same experiment."""
    from medbloom.experiment import load_run_config

    run_dir = Path(args.resume).expanduser().absolute()
    given = [
        f"--{ExperimentConfig.flag(f.name)}"
        for f in ExperimentConfig.knobs()
        if getattr(args, f.name, None) is not None
    ]
    if given or args.config:
        raise MedbloomError(
            f"--resume takes the experiment from {run_dir}/config.json; "
            f"drop {', '.join(given) or '--config'}"
        )
    if not (run_dir / "config.json").is_file():
        raise MedbloomError(f"--resume {run_dir}: not a run directory (no config.json)")
    summary_file = run_dir / "summary.json"
    if summary_file.is_file() and json.loads(summary_file.read_text())["status"] == "finished":
        raise MedbloomError(f"--resume {run_dir}: this run has already finished")
    from medbloom.runs import load_resume_checkpoint

    cfg = load_run_config(run_dir)
    if cfg.score_model:
        raise MedbloomError(
            f"--resume {run_dir}: a federated evaluation (--score-model) has one round and "
            "nothing to resume; run it again with a new --out"
        )
    load_resume_checkpoint(run_dir)  # a broken checkpoint fails here, before anything starts
    return run_dir, cfg


def cmd_run(args: argparse.Namespace) -> int:
    from medbloom.experiment import load_run_config, prepare_run
    from medbloom.federation.server_app import RunInterrupted
    from medbloom.federation.simulation import run_simulation

    _quiet_flower()
    if args.resume:
        run_dir, cfg = resumable_run(args)
    else:
        run_dir = prepare_run(config_from_args(args), argv=["medbloom", *sys.argv[1:]])
        cfg = load_run_config(run_dir)
    print(
        f"medbloom {__version__}: {cfg.dataset} ({cfg.size}px), {cfg.num_clients} clients, "
        f"{cfg.partition} partition, {cfg.model}, {cfg.strategy}, {cfg.rounds} rounds"
    )
    print(f"run directory: {run_dir}", flush=True)

    with stop_on_signals() as stop:
        try:
            run_simulation(
                cfg,
                run_dir,
                Progress(cfg.rounds),
                stop,
                resume=bool(args.resume),
                shield_ray=True,
            )
        except RunInterrupted:
            print(f"medbloom: interrupted; what was recorded is in {run_dir}", file=sys.stderr)
            return 130
    summary = json.loads((run_dir / "summary.json").read_text())
    _print_summary(summary, run_dir)
    return 0 if summary["status"] == "finished" else 1


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    print(f"{summary['status']} in {_duration(summary['wall_seconds'])}")
    for line in summary_lines(summary):
        print(f"  {line}")
    for name, ref in (summary.get("benchmark") or {}).items():
        print(f"  published {name} (centralized): acc {ref['acc']:.3f} auc {ref['auc']:.3f}")
    for line in scored_lines(run_dir):
        print(f"  {line}")
    print(f"results in {run_dir}")


def scored_lines(run_dir: Path) -> list[str]:
    """A federated evaluation's (``--score-model``) per-hospital table, one line each."""
    from medbloom.experiment import load_run_config
    from medbloom.runs import read_metrics

    try:
        if not load_run_config(run_dir).score_model:
            return []
    except MedbloomError:
        return []
    lines = ["each hospital on all its own images (federated evaluation):"]
    for r in read_metrics(run_dir, "clients.csv"):
        if r.get("status") == "ok":
            auc = r.get("site_auc")
            lines.append(
                f"  hospital {r['client_id']}: {r['num_examples']} images, acc "
                f"{r['site_accuracy']:.4f}, auc "
                + (f"{auc:.4f}" if isinstance(auc, float) else "n/a (one class only)")
            )
        else:
            lines.append(f"  hospital {r['client_id']}: {r['status']}: {r.get('error')}")
    return lines


def site_lines(row: dict[str, Any]) -> list[str]:
    """The hospitals' own scores in a metrics row: the model each hospital uses (its
    personal model, or the global one) on its own validation split."""
    from medbloom.personal import MIN_SITE_IMAGES

    small = row.get("small_sites")
    if not _finite(row.get("personal_mean_accuracy")):
        if _finite(small) and small:
            return [
                f"hospitals: every validation split that scored a model in round "
                f"{row.get('round')} holds under {MIN_SITE_IMAGES} images, too few to "
                "summarise; see clients.csv (raise --local-val-fraction)"
            ]
        return []
    return [
        f"hospitals, each on its own validation split (round {row.get('round')}): acc mean "
        f"{row['personal_mean_accuracy']:.4f}, median {row['personal_median_accuracy']:.4f}, "
        f"worst {row['personal_worst_accuracy']:.4f}; balanced acc mean "
        f"{row['personal_mean_balanced_accuracy']:.4f}, worst "
        f"{row['personal_worst_balanced_accuracy']:.4f}"
        + (
            f"; {int(small)} hospital(s) with under {MIN_SITE_IMAGES} validation images left out"
            if _finite(small) and small
            else ""
        )
    ]


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The final and best models' test scores, with their 95% bootstrap intervals
    where summary.json has them, one line each."""
    intervals = summary.get("intervals") or {}
    clean = summary.get("clean_test")
    lines = []

    def scores(row: dict[str, Any], prefix: str, cis: dict[str, Any]) -> str:
        parts = []
        for metric, name in (("accuracy", "acc"), ("auc", "auc"), ("f1", "macro F1")):
            value = row.get(prefix + metric)
            text = f"{name} {float('nan') if value is None else value:.4f}"
            ci = cis.get(metric)
            if ci and all(isinstance(x, int | float) and math.isfinite(x) for x in ci):
                text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
            parts.append(text)
        return ", ".join(parts)

    from medbloom.config import NO_GLOBAL_MODEL

    if summary.get("strategy") in NO_GLOBAL_MODEL:
        lines.append(
            f"no global model: with --strategy {summary['strategy']} each hospital's model is "
            "(in part) its own, so the server's test split scores none"
        )
    lines.extend(site_lines(summary.get("final") or {}))
    for key, label in (("final", "final"), ("best", "best by val auc")):
        row = summary.get(key) or {}
        if not row or not _finite(row.get("accuracy")):
            continue
        lines.append(
            f"{label} (round {row.get('round')}): test " + scores(row, "", intervals.get(key) or {})
        )
        if clean and clean["left_out"] and row.get("clean_accuracy") is not None:
            cis = (intervals.get("clean") or {}).get(key) or {}
            lines.append(
                f"{' ' * len(label)}  clean test ({clean['clean_images']} images): "
                + scores(row, "clean_", cis)
            )
    if clean and not clean["left_out"]:
        lines.append(
            f"clean test split: all {clean['test_images']} test images (none has a twin "
            f"among the training images within {clean['threshold']} bits)"
        )
    elif clean:
        lines.append(
            f"clean test split: {clean['left_out']} of {clean['test_images']} test images left "
            f"out for a twin among the training images ({clean['left_out_exact']} identical, "
            f"{clean['left_out_near']} within {clean['threshold']} bits); see leakage.json"
        )
    elif summary.get("final"):
        lines.append("clean test split: not computed (--audit off)")
    if summary.get("privacy") or summary.get("final"):
        from medbloom.privacy import describe

        lines.append(describe(summary.get("privacy")))
    records = summary.get("calibration") or {}
    which = "best" if records.get("best") else "final"
    calibration = records.get(which)
    if calibration:
        lines.append(
            f"calibration: test ECE {calibration['test_ece_before']:.4f}, "
            f"{calibration['test_ece_after']:.4f} at temperature "
            f"{calibration['temperature']:.3f} (fitted on validation; used by predict and "
            "export); see reliability.png"
        )
        bias = calibration.get("class_bias")
        if bias:
            lines.append(_class_bias_line(bias, which))
    if intervals:
        lines.append(
            f"[ ]: {intervals['level']:.0%} bootstrap intervals, {intervals['resamples']} "
            f"resamples of the test split (seed {intervals['seed']})"
        )
    return lines


# Set once the user asked the run to stop (Ctrl-C, SIGTERM).
_STOPPING = threading.Event()


class _FlowerNoise(logging.Filter):
    """Drops Flower's console notices that say nothing to a medbloom user: the
    deprecation of the Python simulation API medbloom drives on purpose, the skipped
    client-side evaluation (medbloom evaluates at the server), and, once a stop was
    asked for, the errors of workers that the same signal ended (``timeout`` and
    ``systemd`` signal every process of the run; the run's log file keeps them)."""

    NOISE = ("DEPRECATED FEATURE", "fraction_evaluate is set to 0.0", "deprecated feature")

    def filter(self, record: logging.LogRecord) -> bool:
        if _STOPPING.is_set():
            return False
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


def _quiet_flower() -> None:
    """Flower logs every message at INFO; the run's log file keeps them, the console need not."""
    from flwr.common.logger import FLOWER_LOGGER

    for h in FLOWER_LOGGER.handlers:
        if not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)
            h.addFilter(_FlowerNoise())


def cmd_data(args: argparse.Namespace) -> int:
    from medbloom.data import medmnist
    from medbloom.data.registry import dataset_names, spec_of

    if args.data_cmd == "list":
        root = medmnist.resolve_data_root(args.data_dir)
        print(f"data root: {root}")
        print(f"{'name':<16} {'dims':<4} {'task':<26} {'classes':>7}  {'sizes':<14} on disk")
        for name in dataset_names():
            spec = spec_of(name, 0)
            if name in medmnist.info():
                sizes = ",".join(map(str, medmnist.sizes(name)))
                have = ",".join(
                    str(s)
                    for s in medmnist.sizes(name)
                    if medmnist.file_path(name, s, root).is_file()
                )
            else:
                sizes = "any"
                have = "yes" if (root / name / "Training").is_dir() else ""
            print(
                f"{name:<16} {spec.spatial_dims}D   {spec.task:<26} {spec.num_classes:>7}  "
                f"{sizes:<14} {have or '-'}"
            )
        print("any class-folder image set: --dataset folder:PATH (see README)")
        return 0
    if args.data_cmd == "fetch":
        path = medmnist.fetch(args.dataset, args.size, args.data_dir)
        spec = spec_of(args.dataset, args.size)
        medmnist.load_file(path, spec)
        print(f"{path}: OK (MD5 and contents checked)")
        return 0
    if args.data_cmd == "audit":
        return cmd_audit(args)
    # partition
    import numpy as np

    from medbloom.data.partition import label_counts
    from medbloom.experiment import partitions_for, splits_for

    cfg = config_from_args(args)
    splits = splits_for(cfg)
    names = splits.spec.class_names
    width = max(8, *(len(n) for n in names))
    dedup = cfg.dedup
    print(
        f"{cfg.dataset}: {cfg.partition} partition of {len(splits.train)} training samples "
        f"across {cfg.num_clients} clients (seed {cfg.seed}; --dedup {dedup})"
    )
    print(
        f"{'client':>6} {'train':>6} {'val':>5}  "
        + " ".join(f"{n[:width]:>{width}}" for n in names)
    )
    for p in partitions_for(cfg):
        counts = label_counts(splits.train.labels[np.concatenate([p.train, p.val])], len(names))
        print(
            f"{p.client_id:>6} {len(p.train):>6} {len(p.val):>5}  "
            + " ".join(f"{c:>{width}}" for c in counts)
        )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from medbloom.data.audit import check_threshold
    from medbloom.data.registry import load_dataset, resolve_size, spec_of
    from medbloom.leakage import run_audit
    from medbloom.runs import check_output_dir

    threshold = check_threshold(args.dup_threshold)
    spec_of(args.dataset, args.size)
    size = resolve_size(args.dataset, args.size)
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in args.dataset).strip("-.")
    out = Path(args.out) if args.out else Path("audits") / f"{slug[-60:]}-{size}px"
    check_output_dir(out)
    t0 = time.monotonic()
    splits = load_dataset(args.dataset, size, args.data_dir)
    _, text = run_audit(splits, threshold, out, title=f"{args.dataset} at {size} px", progress=True)
    print(text)
    print(
        f"wrote {out / 'audit.json'} and {out / 'contact_sheet.png'} "
        f"in {time.monotonic() - t0:.1f} s"
    )
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from medbloom.experiment import load_run_config, prepare_run
    from medbloom.launch import failure_reason, launch

    if args.resume:
        run_dir, cfg = resumable_run(args)
    else:
        cfg = config_from_args(args)
        if cfg.strategy == "pooled":
            raise ConfigError(
                "--strategy pooled trains one model on every hospital's images in one "
                "place: a baseline for medbloom run, not a deployment"
            )
        if cfg.batched == "on":
            raise ConfigError(
                "--batched on trains every client in the server process, but under "
                "medbloom launch each hospital's data stays in its own process: "
                "use medbloom run, or --batched off"
            )
        run_dir = prepare_run(cfg, argv=["medbloom", *sys.argv[1:]])
        cfg = load_run_config(run_dir)
    mode = "TLS + node authentication" if args.secure else "insecure, 127.0.0.1 only"
    print(
        f"medbloom {__version__}: deployment of {cfg.num_clients} hospital processes and a "
        f"SuperLink on 127.0.0.1 ({mode})"
    )
    print(f"run directory: {run_dir} (per-process logs in {run_dir / 'logs'})", flush=True)
    with stop_on_signals() as stop:
        status = launch(
            cfg,
            run_dir,
            secure=args.secure,
            certs_dir=Path(args.certs) if args.certs else None,
            on_round=Progress(cfg.rounds),
            stop=stop,
            resume=bool(args.resume),
        )
    if status == "interrupted":
        print(f"medbloom: interrupted; what was recorded is in {run_dir}", file=sys.stderr)
        return 130
    if status != "finished":
        print(f"medbloom: the run {status}: {failure_reason(run_dir)}", file=sys.stderr)
        return 1
    _print_summary(json.loads((run_dir / "summary.json").read_text()), run_dir)
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from medbloom.certs import make_certs

    bundle = make_certs(
        Path(args.out), args.num_nodes, hosts=args.host or ["127.0.0.1", "localhost"]
    )
    print(
        f"CA {bundle.ca_cert}, server certificate {bundle.server_cert}, "
        f"{bundle.num_nodes} node key pairs in {bundle.directory}"
    )
    print(
        "give each hospital ca.crt and its own node_<i>; keep ca.key and server.key on the server"
    )
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from medbloom.launch import check_host, flower_env
    from medbloom.system import run_forwarding_signals

    home = Path(args.flwr_home).expanduser().absolute()
    home.mkdir(parents=True, exist_ok=True)
    if args.certs:
        from medbloom.certs import connection_toml, load_bundle

        bundle = load_bundle(Path(args.certs))
        tls = bundle.superlink_tls_args()
        table = connection_toml("medbloom", f"{args.host}:{args.port}", bundle.ca_cert)
    else:
        check_host(args.host, args.allow_insecure_remote)
        tls = ["--insecure"]
        table = f'[superlink.medbloom]\naddress = "{args.host}:{args.port}"\ninsecure = true\n'
    (home / "config.toml").write_text(table)
    cmd = [
        sys.executable,
        "-m",
        "medbloom.federation.superlink",
        *tls,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--database",
        str(home / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    print(
        f"SuperLink on {args.host}:{args.port}; connection 'medbloom' written to "
        f"{home / 'config.toml'} (FLWR_HOME={home})",
        flush=True,
    )
    # SIGTERM (or Ctrl-C) is passed on to the SuperLink, which must not outlive this command
    return run_forwarding_signals(cmd, env=flower_env(home))


def cmd_dashboard(args: argparse.Namespace) -> int:
    from medbloom.dashboard import launch

    print(f"medbloom dashboard on http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    return launch(Path(args.runs), args.port)


def cmd_report(args: argparse.Namespace) -> int:
    from medbloom.model_card import write_model_card
    from medbloom.plots import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "summary.json").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no summary.json)")
    for path in write_report(run_dir):
        print(path)
    print(write_model_card(run_dir))
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        for line in summary_lines(json.loads(summary_file.read_text())):
            print(line)
    return 0


def _class_bias_line(bias: dict[str, Any], which: str) -> str:
    """What the class-bias correction does to the decisions of the ``which`` model."""

    def pair(split: str, key: str) -> str:
        after, before = bias[split]["after"][key], bias[split]["before"][key]
        if after is None or before is None:  # NaN in summary.json: an empty split
            return "n/a"
        return f"{after:.4f} (without {before:.4f})"

    parts = [f"test acc {pair('test', 'accuracy')}"]
    if bias.get("clean"):
        parts.append(f"clean test acc {pair('clean', 'accuracy')}")
    parts.append(f"balanced acc {pair('test', 'balanced_accuracy')}")
    return (
        f"class-bias correction of the {which} model (BCTS, fitted on validation; "
        f"--calibration class-bias in predict, export and evaluate): {', '.join(parts)}"
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from medbloom.trained import load_trained, predict_files

    trained = load_trained(Path(args.run_dir), args.which, args.calibration)
    out = Path(args.out) if args.out else Path(args.run_dir) / "predictions.csv"
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder, expected a CSV file name")
    onnx = Path(args.onnx) if args.onnx else None
    scored, skipped = predict_files(trained, [Path(p) for p in args.paths], out, onnx_model=onnx)
    for path, why in skipped:
        print(f"medbloom: skipped {path}: {why}", file=sys.stderr)
    print(
        f"{scored} image(s) scored by the {trained.which} model (round {trained.round}, "
        f"temperature {trained.temperature:.3f}"
        + (", class biases" if trained.bias is not None else "")
        + (f", {onnx}" if onnx else "")
        + f"); {len(skipped)} skipped; {out}"
    )
    return 0 if scored else 2


def cmd_export(args: argparse.Namespace) -> int:
    from medbloom.trained import export_model, load_trained

    trained = load_trained(Path(args.run_dir), args.which, args.calibration)
    suffix = ".onnx" if args.format == "onnx" else ".pt"
    out = Path(args.out) if args.out else Path(args.run_dir) / "export" / f"model{suffix}"
    model_file, sidecar = export_model(trained, args.format, out)
    print(f"{model_file}\n{sidecar}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medbloom.runs import atomic_write_json
    from medbloom.trained import default_evaluation_path, evaluate_on, load_trained

    trained = load_trained(Path(args.run_dir), args.which, args.calibration)
    result = evaluate_on(trained, args.dataset, args.data_dir or None, args.split)
    out = (
        Path(args.out)
        if args.out
        else default_evaluation_path(Path(args.run_dir), args.dataset, args.split)
    )
    atomic_write_json(out, result)
    s, ci = result["scores"], result["intervals"]
    print(
        f"{args.dataset} ({args.split}, {result['images']} images), the {trained.which} "
        f"model of {args.run_dir}:"
    )
    for key, label in (("accuracy", "ACC"), ("auc", "AUC"), ("f1", "macro F1")):
        low, high = ci[key]
        print(f"  {label:9s} {s[key]:.4f}  [95% CI {low:.4f}, {high:.4f}]")
    biases = ", class biases" if trained.bias is not None else ""
    print(f"  ECE       {s['ece']:.4f}  (temperature {trained.temperature:.3f}{biases})")
    print(out)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from medbloom.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.config, args.out)
    if args.ray_address and args.parallel != 1:
        raise ConfigError("--parallel is for local sweeps; Ray schedules its own tasks")

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the experiments as Ctrl-C does

    signal.signal(signal.SIGTERM, terminate)
    try:
        return run_sweep(sweep, parallel=args.parallel, ray_address=args.ray_address)
    except KeyboardInterrupt:
        print(f"medbloom: sweep interrupted; run it again to go on ({sweep.out})", file=sys.stderr)
        return 130


def cmd_models(args: argparse.Namespace) -> int:
    from medbloom.models import MODELS

    for entry in MODELS.values():
        print(f"{entry.name:<10} {entry.description}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with medbloom's error style: one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"medbloom: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medbloom",
        description="Federated learning for medical image classification on Flower and PyTorch.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"medbloom {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run", help="run an experiment on Flower's simulation engine", epilog=EPILOG
    )
    _add_experiment_flags(run)
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run that was stopped or killed, from its last completed round",
    )
    run.set_defaults(func=cmd_run)

    data = sub.add_parser("data", help="list, fetch and partition data sets")
    dsub = data.add_subparsers(dest="data_cmd", required=True, parser_class=_Parser)
    lst = dsub.add_parser("list", help="every data set, and which files are on disk")
    lst.add_argument("--data-dir", default=None, help="data root (default: as for runs)")
    fetch = dsub.add_parser("fetch", help="download a data set (MD5-checked) into the data root")
    fetch.add_argument("dataset", help="a MedMNIST flag")
    fetch.add_argument("--size", type=int, default=28, help="image size: 28, 64, 128 or 224")
    fetch.add_argument("--data-dir", default=None, help="data root (default: as for runs)")
    audit = dsub.add_parser(
        "audit",
        help="find duplicate and near-duplicate images within and across the splits",
        description="Find exact twins (identical pixels) and near twins (perceptual hash "
        "within --dup-threshold bits) within and across the train, val and test splits; "
        "print a table, write audit.json (every pair) and contact_sheet.png.",
        epilog=EPILOG,
    )
    audit.add_argument("dataset", help="a MedMNIST flag, brain-tumor-mri or folder:PATH")
    audit.add_argument("--size", type=int, default=0, help="image size (0: the default)")
    audit.add_argument("--data-dir", default=None, help="data root (default: as for runs)")
    audit.add_argument(
        "--dup-threshold",
        type=int,
        default=DUP_THRESHOLD,
        metavar="BITS",
        help=f"near twins differ in at most this many of the hash's 256 bits "
        f"(default {DUP_THRESHOLD})",
    )
    audit.add_argument(
        "--out", metavar="DIR", help="where to write (default: audits/<dataset>-<size>px)"
    )
    part = dsub.add_parser("partition", help="print each client's label counts for a partition")
    _add_experiment_flags(part)
    data.set_defaults(func=cmd_data)

    launch_p = sub.add_parser(
        "launch",
        help="run an experiment as real processes: a SuperLink and one per hospital",
        epilog=EPILOG,
    )
    _add_experiment_flags(launch_p)
    launch_p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    launch_p.add_argument(
        "--secure", action="store_true", help="TLS and SuperNode authentication (keys in --certs)"
    )
    launch_p.add_argument(
        "--certs", metavar="DIR", help="certificates from `medbloom certs` (default: RUN_DIR/certs)"
    )
    launch_p.set_defaults(func=cmd_launch)

    server = sub.add_parser("server", help="start the SuperLink of a multi-site deployment")
    server.add_argument("--host", default="127.0.0.1", help="address to serve on")
    server.add_argument("--port", type=int, default=9092, help="port hospitals connect to")
    server.add_argument("--certs", metavar="DIR", help="TLS + node authentication from DIR")
    server.add_argument(
        "--flwr-home",
        default="~/.flwr-medbloom",
        metavar="DIR",
        help="where the SuperLink keeps its state and `flwr` its connection",
    )
    server.add_argument(
        "--allow-insecure-remote",
        action="store_true",
        help="allow serving without TLS on a non-loopback address (warns)",
    )
    server.set_defaults(func=cmd_server)

    node = sub.add_parser(
        "node",
        help="one hospital: a SuperNode with medbloom's ClientApp (flower-supernode flags)",
        add_help=False,
    )
    node.set_defaults(func=None)

    certs = sub.add_parser("certs", help="make a local CA, server certificate and node keys")
    certs.add_argument("--out", default="certs", help="folder to write the keys into")
    certs.add_argument("--num-nodes", type=int, default=3, help="node key pairs to make")
    certs.add_argument("--host", action="append", help="server name or IP (repeatable)")
    certs.set_defaults(func=cmd_certs)

    dash = sub.add_parser("dashboard", help="live dashboard of run directories (Streamlit)")
    dash.add_argument("--runs", default="runs", help="folder holding run directories")
    dash.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1")
    dash.set_defaults(func=cmd_dashboard)

    report = sub.add_parser(
        "report", help="write a run's plots (PNG) and model card (model_card.md) into it"
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    report.set_defaults(func=cmd_report)

    def model_args(command: argparse.ArgumentParser) -> None:
        """RUN_DIR and --which: the run, and which of its models."""
        command.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
        command.add_argument(
            "--which",
            default="best",
            choices=("best", "final"),
            help="best (highest validation AUC, the default) or final",
        )
        command.add_argument(
            "--calibration",
            default="temperature",
            choices=("temperature", "class-bias"),
            help="temperature (the default): probabilities softened by the temperature "
            "fitted on validation, no decision changes; class-bias: also a bias per "
            "class fitted on validation (BCTS), which moves decisions where the model "
            "under-calls a class (benchmarks/README.md)",
        )

    predict = sub.add_parser(
        "predict",
        help="score image files with a run's model; a CSV of classes and probabilities",
        description="Score image files (or the images in folders, recursively) with a "
        "run's model, preprocessed as the run's data set was; one CSV row per image: "
        "path, predicted class, the calibrated probability of every class. Unreadable "
        "files are listed and skipped.",
    )
    model_args(predict)
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--out", metavar="CSV", help="default: RUN_DIR/predictions.csv")
    predict.add_argument(
        "--onnx", metavar="FILE", help="score with this exported ONNX model (ONNX Runtime)"
    )
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser(
        "export",
        help="write a run's model as ONNX or TorchScript, with a JSON of what it expects",
    )
    model_args(export)
    export.add_argument(
        "--format",
        default="onnx",
        choices=("onnx", "torchscript"),
        help="onnx (data, for ONNX Runtime; the default) or torchscript (a program "
        "torch.jit.load runs: share only with those who trust you)",
    )
    export.add_argument(
        "--out", metavar="FILE", help="default: RUN_DIR/export/model.onnx (or model.pt)"
    )
    export.set_defaults(func=cmd_export)

    evaluate = sub.add_parser(
        "evaluate",
        help="score a run's model on another data set or folder (external validation)",
        description="Score a run's model on a data set (any --dataset a run accepts, "
        "folder:PATH included) at the run's image size, with the run's metrics, 95%% "
        "bootstrap intervals and calibration error; nothing is trained. Writes "
        "RUN_DIR/evaluations/<dataset>-<split>.json.",
    )
    model_args(evaluate)
    evaluate.add_argument("--dataset", required=True, help="data set name or folder:PATH")
    evaluate.add_argument("--data-dir", default="", help="data root (as for run)")
    evaluate.add_argument(
        "--split",
        default="test",
        choices=("test", "val", "train", "all"),
        help="which split to score (default test; all: every image, for a set the model never saw)",
    )
    evaluate.add_argument("--out", metavar="JSON", help="where to write the result")
    evaluate.set_defaults(func=cmd_evaluate)

    sweep = sub.add_parser(
        "sweep",
        help="run every experiment of a grid (e.g. strategy x alpha x seed), resumable",
        description="Run every experiment of a sweep file's grid, each as `medbloom run`; "
        "a finished experiment is not run again, a stopped one is resumed. Writes "
        "sweep.csv, comparison.md (mean +/- std over seeds) and sweep.png.",
        epilog=EPILOG,
    )
    sweep.add_argument("--config", required=True, metavar="FILE", help="the sweep file (TOML)")
    sweep.add_argument(
        "--out",
        metavar="DIR",
        help="sweep folder (default: [sweep] out, else sweeps/<name>)",
    )
    sweep.add_argument(
        "--parallel", type=int, default=1, metavar="N", help="experiments at a time (default 1)"
    )
    sweep.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="run the experiments as tasks on this Ray cluster (e.g. 10.0.0.5:6379); "
        "the sweep folder and data must be where every node sees them",
    )
    sweep.set_defaults(func=cmd_sweep)

    models = sub.add_parser("models", help="list the models")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["node"]:
        # flower-supernode's flags pass through untouched
        from medbloom.federation.node import main as node_main

        node_main(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MedbloomError as exc:
        print(f"medbloom: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("medbloom: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `medbloom data list | head`: the reader left; that is not an error.
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        return 0


# Commands that end with everything written and every process they started ended,
# waited for by PID. (Not `run`: Ray's workers are still exiting when it returns.)
_FAST_EXIT = ("launch",)


def entry() -> NoReturn:
    """The ``medbloom`` command. After ``launch`` it leaves without the interpreter's
    teardown of torch and Flower (about 1 s): the run is written and its processes
    have ended by then."""
    code = main()
    if sys.argv[1:2] and sys.argv[1] in _FAST_EXIT:
        from medbloom.system import exit_without_teardown

        exit_without_teardown(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
