"""`medbloom sweep`: bad sweep files fail before anything runs; a real sweep runs, stops on
Ctrl-C, goes on where it was, compares its grid points over seeds, and runs on Ray."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ray_processes, tagged_env
from medbloom.errors import ConfigError
from medbloom.sweep import comparison_table, experiment_status, grouped, load_sweep, result_rows
from synthetic import write_npz

BASE = """
[base]
data-dir = "{data}"
num-clients = 2
rounds = 2
min-partition-size = 5
batch-size = 16
"""


def _sweep_file(tmp_path: Path, grid: str, base: str | None = None, name: str = "s") -> Path:
    path = tmp_path / f"{name}.toml"
    text = (base if base is not None else BASE.format(data=tmp_path / "data")) + grid
    path.write_text(text)
    return path


# ------------------------------------------------------------------- bad input
BAD = {
    "unknown option": (
        "[grid]\nstrategee = ['fedavg']\n",
        "'strategee' is not an experiment option",
    ),
    "unknown base option": ("[grid]\nseed = [0]\n", "'colour' is not an experiment option"),
    "no grid": ("", "the grid is empty"),
    "empty grid table": ("[grid]\n", "the grid is empty"),
    "empty values": ("[grid]\nalpha = []\n", "[grid] alpha is empty"),
    "not a list": ("[grid]\nalpha = 0.5\n", "[grid] alpha = 0.5: expected a list"),
    "out of range": ("[grid]\nalpha = [0.5, -1.0]\n", "--alpha -1.0 is out of range"),
    "unknown choice": (
        "[grid]\nstrategy = ['fedavg', 'fedbest']\n",
        "--strategy 'fedbest' is unknown",
    ),
    "wrong type": (
        "[grid]\nlocal-epochs = [1, 'many']\n",
        "local-epochs = 'many' is not a valid int",
    ),
    "out in grid": ("[grid]\nout = ['a', 'b']\n", "each experiment's folder is the sweep's"),
    "twice": ("[grid]\nrounds = [2, 3]\n", "rounds is in both [base] and [grid]"),
    "same value twice": ("[grid]\nseed = [1, 1]\n", "lists a value twice"),
    "unknown table": ("[grid]\nseed = [1]\n[sweeep]\nname = 'x'\n", "unknown table(s) sweeep"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_sweep_file_is_refused_before_anything(tmp_path: Path, case: str) -> None:
    grid, message = BAD[case]
    base = BASE.format(data=tmp_path / "data")
    if case == "unknown base option":
        base += "colour = 'red'\n"
    with pytest.raises(ConfigError) as err:
        load_sweep(_sweep_file(tmp_path, grid, base), str(tmp_path / "out"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_impossible_partition_is_refused_before_anything(tmp_path: Path) -> None:
    _data(tmp_path)
    grid = "[grid]\nalpha = [1.0, 0.01]\nnum-clients = [8]\n"
    path = _sweep_file(
        tmp_path, grid, BASE.format(data=tmp_path / "data").replace("num-clients = 2\n", "")
    )
    with pytest.raises(ConfigError) as err:
        load_sweep(path, str(tmp_path / "out"))
    assert "alpha=0.01-num-clients=8: --partition dirichlet with --alpha 0.01" in str(err.value)
    assert "could not give all 8 clients at least --min-partition-size 5" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_command_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    _data(tmp_path)
    path = _sweep_file(tmp_path, "[grid]\nalpha = [0.5, 0.0]\n")
    out = tmp_path / "out"
    for extra in ([], ["--parallel", "0"]):
        if extra:
            path = _sweep_file(tmp_path, "[grid]\nalpha = [0.5]\n")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "medbloom",
                "sweep",
                "--config",
                str(path),
                "--out",
                str(out),
                *extra,
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert ("--alpha 0.0 is out of range" if not extra else "--parallel 0") in proc.stderr
        assert not out.exists()


def test_the_grid_is_every_combination(tmp_path: Path) -> None:
    _data(tmp_path)
    path = _sweep_file(
        tmp_path,
        "[sweep]\nname = 'cmp'\n[grid]\nstrategy = ['fedavg', 'fedprox']\nalpha = [0.1, 1.0]\n"
        "seed = [0, 1, 2]\n",
    )
    sweep = load_sweep(path, str(tmp_path / "out"))
    assert sweep.name == "cmp" and len(sweep.experiments) == 12
    first = sweep.experiments[0]
    assert first.id == "001-strategy=fedavg-alpha=0.1-seed=0"
    assert first.config["rounds"] == 2 and first.point == {
        "strategy": "fedavg",
        "alpha": 0.1,
        "seed": 0,
    }
    assert len({e.id for e in sweep.experiments}) == 12


REPO = Path(__file__).resolve().parents[1]
BENCH_SWEEPS = sorted((REPO / "benchmarks" / "sweeps").glob("*.toml"))


@pytest.mark.parametrize("path", BENCH_SWEEPS, ids=[p.stem for p in BENCH_SWEEPS])
def test_every_benchmark_sweep_file_is_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweeps benchmarks/README.md quotes load as written: every key is an option,
    every value in range, every grid point a valid experiment (data-dir resolves from the
    repository root, as their commands are run)."""
    if not (REPO.parent / "shared" / "datasets").is_dir():
        pytest.skip("../shared/datasets is absent: the benchmark sweeps read their data there")
    monkeypatch.chdir(REPO)
    sweep = load_sweep(path)
    # results go to the ignored sweeps/ folder, never next to the committed files
    assert sweep.experiments and sweep.out.is_relative_to(REPO / "sweeps"), sweep.out


def _fake_run(run_dir: Path, status: str, acc: float, auc: float, worst: float) -> None:
    """A run's summary.json and metrics.csv as RunRecorder writes them (the fields the
    sweep reads); the hospitals last scored a model in round 1 (--site-eval-every 1 of
    a run stopped... or every 2nd round), so round 2's cell is empty."""
    run_dir.mkdir(parents=True)
    final = {"round": 2, "accuracy": acc, "auc": auc, "f1": acc - 0.1, "clean_accuracy": acc - 0.05}
    summary = {"status": status, "rounds_completed": 2, "final": final, "wall_seconds": 3.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    rows = f"round,accuracy,worst_site_accuracy\n0,0.5,\n1,0.6,{worst!r}\n2,{acc!r},\n"
    (run_dir / "metrics.csv").write_text(rows)


def test_comparison_is_mean_and_std_over_seeds(tmp_path: Path) -> None:
    _data(tmp_path)
    path = _sweep_file(tmp_path, "[grid]\nstrategy = ['fedavg', 'fedprox']\nseed = [0, 1, 2]\n")
    sweep = load_sweep(path, str(tmp_path / "out"))
    accs = {"fedavg": [0.80, 0.84, 0.88], "fedprox": [0.70, 0.75, 0.0]}
    for exp in sweep.experiments:
        s, seed = exp.point["strategy"], exp.point["seed"]
        status = "failed" if (s, seed) == ("fedprox", 2) else "finished"
        _fake_run(exp.run_dir(sweep.out), status, accs[s][seed], 0.9, accs[s][seed] - 0.2)
    rows = result_rows(sweep)
    assert [r["status"] for r in rows].count("finished") == 5
    groups = {g["strategy"]: g for g in grouped(sweep, rows)}
    assert groups["fedavg"]["n"] == 3 and groups["fedprox"]["n"] == 2  # the failed one is out
    assert groups["fedavg"]["accuracy_mean"] == pytest.approx(0.84)
    assert groups["fedavg"]["accuracy_std"] == pytest.approx(0.04)  # sample std of .80 .84 .88
    assert groups["fedprox"]["worst_site_accuracy_mean"] == pytest.approx(0.525)
    table = comparison_table(sweep, rows)
    assert groups["fedavg"]["clean_accuracy_mean"] == pytest.approx(0.79)
    assert (
        "| fedavg | 3/3 | 0.840 +/- 0.040 | 0.790 +/- 0.040 | 0.900 +/- 0.000 | 0.640 +/- 0.040 |"
        in table
    )
    assert "| fedprox | 2/3 | 0.725 +/- 0.035 |" in table


# ----------------------------------------------------------------- real sweeps
def _data(tmp_path: Path) -> None:
    write_npz(
        tmp_path / "data", "pneumoniamnist", counts={"train": 80, "val": 20, "test": 30}, seed=1
    )


def _sweep(args: list[str], tag: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "medbloom", "sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=tagged_env(tag),
        start_new_session=True,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.slow
def test_a_stopped_sweep_goes_on_where_it_was(tmp_path: Path) -> None:
    _data(tmp_path)
    path = _sweep_file(tmp_path, "[grid]\nstrategy = ['fedavg', 'fedprox']\n")
    out = tmp_path / "out"
    sweep = load_sweep(path, str(out))
    first, second = (e.run_dir(out) for e in sweep.experiments)
    proc = _sweep(["--config", str(path), "--out", str(out)], "sweep-stop")
    # SIGTERM to the sweep's own process (as kill, a scheduler or systemd send it; its
    # experiments run in sessions of their own) once the first experiment has finished
    # and the second has recorded a round: the sweep stops the second itself
    deadline = time.monotonic() + 180
    while not (
        experiment_status(first) == "finished" and (second / "checkpoints" / "latest.pt").exists()
    ):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode in (1, 130, 143), output  # 1: the second had just finished anyway
    assert "Traceback" not in output, output
    assert json.loads((second / "summary.json").read_text())["status"] in (
        "interrupted",
        "finished",
    )
    stamp = (first / "summary.json").stat().st_mtime_ns
    again = _sweep(["--config", str(path), "--out", str(out)], "sweep-stop")
    output = again.communicate(timeout=180)[0]
    assert again.returncode == 0, output
    assert (first / "summary.json").stat().st_mtime_ns == stamp  # not run again
    assert "2 experiments, 1 finished, 1 to run" in output or "2 finished, 0 to run" in output
    log = (out / "logs" / f"{sweep.experiments[1].id}.log").read_text()
    if "1 to run" in output:  # the second went on from its checkpoint
        assert (
            "--resume" in log
            and "resuming after round" in (second / "logs" / "server.log").read_text()
        )
    with (out / "sweep.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert all(0 <= float(r["accuracy"]) <= 1 and r["rounds_completed"] == "2" for r in rows)
    assert "| fedprox | 1/1 |" in (out / "comparison.md").read_text()
    assert (out / "sweep.png").stat().st_size > 0
    # a third time: nothing to run; a different sweep in the same folder is refused
    third = subprocess.run(
        [sys.executable, "-m", "medbloom", "sweep", "--config", str(path), "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert third.returncode == 0 and "2 finished, 0 to run" in third.stdout
    other = _sweep_file(tmp_path, "[grid]\nstrategy = ['fedavg', 'fedadam']\n", name="other")
    refused = subprocess.run(
        [sys.executable, "-m", "medbloom", "sweep", "--config", str(other), "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2 and "holds another sweep" in refused.stderr
    assert not ray_processes("sweep-stop")


def test_a_stop_between_two_experiments_stops_the_next_one_too(tmp_path: Path) -> None:
    """SIGTERM landing after one experiment finished and before the next one started
    used to find no experiment to stop: the next then ran to its end while the sweep
    waited for it. Now an experiment that starts after the stop does not run."""
    from medbloom import sweep as sweep_module

    ran = tmp_path / "ran"
    sweep_module.stop_experiments()
    try:
        rc = sweep_module.run_experiment(
            ["-c", f"open({str(ran)!r}, 'w').write('x')"], str(tmp_path / "log.txt")
        )
    finally:
        sweep_module._STOPPING.clear()
    assert rc == sweep_module.STOPPED_BEFORE_START and not ran.exists()
    # cleared (as each sweep does when it starts), experiments run again
    assert (
        sweep_module.run_experiment(
            ["-c", f"open({str(ran)!r}, 'w').write('x')"], str(tmp_path / "log.txt")
        )
        == 0
        and ran.exists()
    )


HEAD = """
import sys, ray
ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""


@pytest.mark.slow
def test_a_sweep_runs_on_a_ray_cluster(tmp_path: Path) -> None:
    """Two experiments as tasks on a local Ray instance (started here, ended by its PID)."""
    _data(tmp_path)
    path = _sweep_file(tmp_path, "[grid]\nseed = [0, 1]\n")
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=tagged_env("sweep-ray"),
    )
    try:
        address = head.stdout.readline().strip() if head.stdout else ""
        assert address.startswith("127.0.0.1:"), address
        proc = _sweep(
            ["--config", str(path), "--out", str(tmp_path / "out"), "--ray-address", address],
            "sweep-ray",
        )
        output = proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, output
        assert f"Ray at {address}" in output
        with (tmp_path / "out" / "sweep.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert [(r["seed"], r["status"]) for r in rows] == [("0", "finished"), ("1", "finished")]
        assert not math.isnan(float(rows[0]["accuracy"]))
        assert "| 2/2 |" in (tmp_path / "out" / "comparison.md").read_text()
    finally:
        if head.stdin:
            head.stdin.close()
        head.wait(timeout=60)
    deadline = time.monotonic() + 30
    while ray_processes("sweep-ray") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes("sweep-ray")


def test_an_unreachable_ray_cluster_is_a_clear_error(tmp_path: Path) -> None:
    _data(tmp_path)
    path = _sweep_file(tmp_path, "[grid]\nseed = [0]\n")
    proc = subprocess.run(
        [
            sys.executable, "-m", "medbloom", "sweep", "--config", str(path),
            "--out", str(tmp_path / "out"), "--ray-address", "127.0.0.1:1",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--ray-address 127.0.0.1:1: cannot connect to Ray" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written
