"""``model_card.md``: what a run's model is, how it was made, how well it does, and
what it must not be used for, written from the run directory alone (so it is always
true to the run). Written when a run ends and by ``medbloom report``.

The sections follow Mitchell et al., "Model Cards for Model Reporting" (2019): details,
intended use, data, training, evaluation (with intervals, per class, per hospital),
calibration, privacy, limits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medbloom.runs import atomic_write_text, read_metrics


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _f(x: Any, digits: int = 3) -> str:
    if isinstance(x, (int, float)) and math.isfinite(float(x)):
        return f"{float(x):.{digits}f}"
    return "n/a"


def _ci(interval: Any) -> str:
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        return f"[{_f(interval[0])}, {_f(interval[1])}]"
    return ""


def _last_per_class(run_dir: Path, round_: Any) -> dict[str, Any] | None:
    last = None
    try:
        lines = (run_dir / "per_class.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("round") == round_:
            last = entry
    return last


def model_card(run_dir: Path) -> str:
    """The card's Markdown text for ``run_dir``."""
    info = _load(run_dir / "config.json") or {}
    cfg: dict[str, Any] = info.get("config", {})
    summary: dict[str, Any] = _load(run_dir / "summary.json") or {}
    calibration = summary.get("calibration") or {}
    leakage = _load(run_dir / "leakage.json") or {}
    parts = (_load(run_dir / "partitions.json") or {}).get("clients", [])
    final = summary.get("final") or {}
    best = summary.get("best") or {}
    intervals = summary.get("intervals") or {}
    classes = summary.get("class_names") or []
    privacy = summary.get("privacy") or {}
    versions = info.get("versions", {})
    out: list[str] = []
    add = out.append

    add(f"# Model card: {cfg.get('model', '?')} on {cfg.get('dataset', '?')}\n")
    add(
        f"Written by medbloom from `{run_dir.name}` (run {summary.get('status', 'unknown')}, "
        f"{summary.get('rounds_completed', '?')} of {summary.get('rounds_planned', '?')} "
        f"rounds, last updated {summary.get('updated_at', '?')}). Every number below is "
        "read from that run directory.\n"
    )

    add("## Model details\n")
    add(f"- Architecture: `{cfg.get('model')}` (pretrained: {cfg.get('pretrained', 'none')}, "
        f"frozen: {cfg.get('freeze', 'none')})")  # fmt: skip
    add(f"- Task: {summary.get('task')}; classes: {', '.join(classes)}")
    add(f"- Input: {summary.get('spatial_dims')}D, {summary.get('image_size')} px, "
        f"{summary.get('in_channels')} channel(s), pixels scaled to [-1, 1]")  # fmt: skip
    from medbloom.config import NO_GLOBAL_MODEL, PERSONAL

    strategy = cfg.get("strategy")
    if strategy in NO_GLOBAL_MODEL:
        add(
            f"- No global model: with `{strategy}` each hospital's model is (in part) its "
            "own and stays at the hospital (`hospitals/personal-*.pt` in a simulation); "
            "`checkpoints/latest.pt` holds only the shared part, not a usable model"
        )
    else:
        add(
            f"- Checkpoints: `checkpoints/best.pt` (round {best.get('round', '?')}, highest "
            f"validation AUC) and `checkpoints/latest.pt` (round {final.get('round', '?')})"
        )
    if strategy in PERSONAL:
        add(
            "- Personalised: each hospital also keeps a model of its own; the per-hospital "
            "table below scores it"
        )
    add(
        "- Software: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; seed {cfg.get('seed')}\n"
    )

    add("## Intended use\n")
    add(
        "Research on federated learning for medical image classification: comparing "
        "training recipes, partitions and privacy settings, and a starting point for a "
        f"model to be validated further. It classifies {summary.get('image_size')} px "
        f"images of the kind in `{cfg.get('dataset')}` into the classes above.\n"
    )
    add("**Not for** clinical diagnosis or triage, or any decision about a patient: it "
        "has not been validated prospectively, on other scanners or hospitals, or by a "
        "regulator. Images unlike the training data (another modality, body part, "
        "resolution or population) give confident but meaningless outputs.\n")  # fmt: skip

    add("## Data and partition\n")
    alpha = f" (alpha {cfg.get('alpha')})" if cfg.get("partition") == "dirichlet" else ""
    add(
        f"- Data set: `{cfg.get('dataset')}` at {summary.get('image_size')} px, "
        f"{cfg.get('num-clients')} hospitals, partition `{cfg.get('partition')}`{alpha}"
    )
    if parts:
        sizes = [int(p.get("num_train", 0)) for p in parts]
        add(f"- Training images per hospital: {min(sizes)} to {max(sizes)} "
            f"({sum(sizes)} in all)")  # fmt: skip
    audit = leakage.get("audit") or {}
    clean = leakage.get("clean_test") or summary.get("clean_test") or {}
    if audit:
        add(f"- Leakage audit: {audit.get('test_with_train_twin', '?')} of "
            f"{audit.get('images', {}).get('test', '?')} test images have a twin in "
            f"training (threshold {audit.get('threshold')}); the clean test split keeps "
            f"{clean.get('clean_images', '?')}")  # fmt: skip
    dedup = leakage.get("dedup") or {}
    if dedup:
        add(f"- De-duplication of training images: {dedup.get('mode')} "
            f"({dedup.get('removed', 0)} removed)")  # fmt: skip
    skipped = summary.get("skipped_files") or []
    if skipped:
        add(f"- Unreadable files skipped when loading: {len(skipped)}")
    add("")

    add("## Training recipe\n")
    add(f"- Strategy `{cfg.get('strategy')}`, {cfg.get('rounds')} rounds, fraction of "
        f"hospitals per round {cfg.get('fraction-train')}")  # fmt: skip
    add(f"- Local training: {cfg.get('local-epochs')} epoch(s) a round, optimizer "
        f"{cfg.get('optimizer')}, lr {cfg.get('lr')} ({cfg.get('lr-schedule')}), batch "
        f"{cfg.get('batch-size')}, class weighting {cfg.get('class-weighting')}, "
        f"augmentation {cfg.get('augment')}\n")  # fmt: skip

    add("## Evaluation (test split)\n")
    add("| model | round | ACC [95% CI] | AUC [95% CI] | macro F1 [95% CI] | clean ACC |")
    add("|---|---|---|---|---|---|")
    for name, row in (("final", final), ("best", best)):
        if not row:
            continue
        ci = intervals.get(name) or {}
        add(
            f"| {name} | {row.get('round')} | {_f(row.get('accuracy'))} "
            f"{_ci(ci.get('accuracy'))} | {_f(row.get('auc'))} {_ci(ci.get('auc'))} | "
            f"{_f(row.get('f1'))} {_ci(ci.get('f1'))} | {_f(row.get('clean_accuracy'))} |"
        )
    add(
        f"\nIntervals: {intervals.get('method', 'none recorded')}, "
        f"{intervals.get('resamples', '?')} resamples.\n"
        if intervals
        else ""
    )
    per_class = _last_per_class(run_dir, final.get("round"))
    if per_class:
        add("Per class (final model):\n")
        add("| class | precision | recall | F1 | images |")
        add("|---|---|---|---|---|")
        for i, name in enumerate(per_class.get("class_names", [])):
            add(
                f"| {name} | {_f(per_class['precision'][i])} | {_f(per_class['recall'][i])} "
                f"| {_f(per_class['f1'][i])} | {per_class['support'][i]} |"
            )
        add("")
    clients = read_metrics(run_dir, "clients.csv")
    latest: dict[Any, dict[str, Any]] = {}
    for row in clients:
        if row.get("status") == "ok" and row.get("site_accuracy") is not None:
            latest[row["client_id"]] = row
    if latest and strategy in PERSONAL:
        add("Per hospital, on its own held-out images in its last recorded round: the "
            "hospital's own model, and the global model it received:\n")  # fmt: skip
        add("| hospital | round | own model ACC | own balanced ACC | own AUC | global ACC "
            "| held-out images | training images |")  # fmt: skip
        add("|---|---|---|---|---|---|---|---|")
        for cid in sorted(latest, key=lambda c: int(c)):
            r = latest[cid]
            add(f"| {cid} | {r['round']} | {_f(r.get('personal_accuracy'))} | "
                f"{_f(r.get('personal_balanced_accuracy'))} | {_f(r.get('personal_auc'))} | "
                f"{_f(r.get('site_accuracy'))} | {r.get('val_size')} | "
                f"{r.get('num_examples')} |")  # fmt: skip
        add("")
    elif latest:
        add("Per hospital (the global model of the hospital's last recorded round, on "
            "its own held-out images):\n")  # fmt: skip
        add("| hospital | round | ACC | AUC | training images |")
        add("|---|---|---|---|---|")
        for cid in sorted(latest, key=lambda c: int(c)):
            r = latest[cid]
            add(f"| {cid} | {r['round']} | {_f(r.get('site_accuracy'))} | "
                f"{_f(r.get('site_auc'))} | {r.get('num_examples')} |")  # fmt: skip
        add("")

    add("## Calibration\n")
    if calibration:
        for name in ("best", "final"):
            c = calibration.get(name)
            if c:
                add(f"- {name} model: temperature {_f(c['temperature'], 3)} (fitted on the "
                    f"validation split); test ECE {_f(c['test_ece_before'])} before, "
                    f"{_f(c['test_ece_after'])} after")  # fmt: skip
                bias = c.get("class_bias")
                if bias:
                    t = bias["test"]
                    add(f"- {name} model, class-bias correction (BCTS: a temperature and "
                        f"a bias per class, fitted on the validation split): test ACC "
                        f"{_f(t['after']['accuracy'])} with it, {_f(t['before']['accuracy'])} "
                        f"without; balanced ACC {_f(t['after']['balanced_accuracy'])} and "
                        f"{_f(t['before']['balanced_accuracy'])}")  # fmt: skip
        add("- `medbloom predict` and `medbloom export` apply the temperature, and the "
            "class biases with `--calibration class-bias`; `reliability.png` shows the "
            "reliability diagram.\n")  # fmt: skip
    else:
        add(
            "Not recorded (the run ended before its calibration step, or was made by an "
            "earlier medbloom).\n"
        )

    add("## Privacy\n")
    if privacy.get("mode") in ("sample", "hospital"):
        add(f"- ({_f(privacy.get('epsilon'), 2)}, {privacy.get('delta')})-differential "
            f"privacy per {privacy.get('unit')}, {privacy.get('accountant')}, clip norm "
            f"{privacy.get('clip_norm')}")  # fmt: skip
    else:
        add("- No formal privacy guarantee: images stayed at the hospitals, but the model "
            "updates they sent can leak information about them.")  # fmt: skip
    secure = privacy.get("secure_aggregation")
    if secure:
        add(
            f"- Secure aggregation ({secure.get('protocol')}): the server saw only the sum "
            f"of the hospitals' updates, unmasked with the key shares of at least "
            f"{secure.get('threshold')} hospitals; their metrics travelled in the clear.\n"
        )
    else:
        add("- Updates travelled in the clear to the server (no secure aggregation).\n")

    add("## Known limits\n")
    limits = [
        "Trained and tested on one public data set; no external validation is recorded "
        "here (see `evaluations/` if `medbloom evaluate` was run).",
        "Test scores are for the test split's case mix; prevalence elsewhere changes "
        "precision and accuracy.",
    ]
    if audit and audit.get("test_with_train_twin"):
        limits.append("Some test images have near twins in training: read the clean test scores.")
    if final and best and final.get("round") != best.get("round"):
        limits.append("The best model was selected on the validation split, not the test split.")
    sites: list[float] = [
        float(v)
        for v in (r.get("site_accuracy") for r in latest.values())
        if isinstance(v, (int, float)) and math.isfinite(v)
    ]
    if sites and min(sites) < float(final.get("accuracy") or 0) - 0.1:
        limits.append(
            f"Accuracy differs between hospitals (lowest {_f(min(sites))}): it does not "
            "work equally well everywhere."
        )
    for item in limits:
        add(f"- {item}")
    add("")
    return "\n".join(out)


def write_model_card(run_dir: Path) -> Path:
    path = run_dir / "model_card.md"
    atomic_write_text(path, model_card(run_dir))
    return path
