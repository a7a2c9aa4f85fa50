"""Record-level differential privacy (--privacy sample): Opacus' DP-SGD at each
hospital, its accountant, the ledger each hospital keeps, and the bad input refused."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from conftest import stop_after_round
from medbloom.config import ExperimentConfig
from medbloom.errors import ConfigError
from medbloom.experiment import prepare_run
from medbloom.privacy import Ledger, Plan, check_model, epsilon_of, plan_for, train_private
from synthetic import write_npz


def _plan(noise: float, clip: float = 1.0, sample_rate: float = 1.0) -> Plan:
    return Plan(noise, sample_rate, 1, 1, 8.0, 1e-5, clip)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).sum())


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: Plan, **kw: object) -> None:
    train_private(
        model,
        x,
        y,
        plan=plan,
        criterion=nn.CrossEntropyLoss(),
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1.0),
        epochs=1,
        batch_size=len(x),
        seed=int(kw.get("seed", 0)),  # type: ignore[call-overload]
        noise_seed=int(kw.get("noise_seed", 1)),  # type: ignore[call-overload]
        device=torch.device("cpu"),
        augment=None,
        correct=_ce,
    )


def test_dp_sgd_trains_with_the_logit_adjusted_loss() -> None:
    """Opacus' per-sample gradients of the logit-adjusted loss: without noise, a class
    the hospital lacks gets no gradient at all, so its output row stays where it was;
    with plain cross-entropy it moves."""
    from medbloom.training import class_log_prior, loss_function

    torch.manual_seed(1)
    x, y = torch.randn(24, 1, 4, 4), torch.arange(24) % 2 * 2  # classes 0 and 2 of 3
    prior = class_log_prior(y.numpy(), 3, "logit-adjust")
    rows = {}
    for name, criterion in (
        ("plain", nn.CrossEntropyLoss()),
        ("adjusted", loss_function("multi-class", log_prior=prior)),
    ):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        before = model[1].weight[1].detach().clone()
        train_private(
            model, x, y, plan=_plan(0.0), criterion=criterion,
            make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1.0), epochs=1,
            batch_size=len(x), seed=0, noise_seed=1, device=torch.device("cpu"),
            augment=None, correct=_ce,
        )  # fmt: skip
        rows[name] = float((model[1].weight[1].detach() - before).abs().max())
    assert rows["plain"] > 1e-3
    assert rows["adjusted"] == 0.0


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def test_the_noise_is_the_accountants_for_the_target_and_epsilon_is_its_own() -> None:
    """The plan's noise is what Opacus' own calibration gives; after every planned
    round the ledger's epsilon equals Opacus' RDP accountant's on the same steps and
    is at most the target."""
    plan = plan_for(100, 32, 2, 5, target_epsilon=3.0, delta=1e-5, clip_norm=1.0)
    assert plan.sample_rate == 1 / 4 and plan.steps_per_round == 8
    assert plan.noise_multiplier == pytest.approx(
        get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.25, steps=40)
    )
    accountant = RDPAccountant()
    for _ in range(40):
        accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=0.25)
    history = [(plan.noise_multiplier, 0.25, 8)] * 5
    assert epsilon_of(history, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))
    assert 2.9 < epsilon_of(history, 1e-5) <= 3.0


def test_the_accountant_records_what_was_planned_where_opacus_rounds_down() -> None:
    """2955 images in batches of 32 are 93 batches, and Opacus' Poisson loader runs
    int(1 / (1 / 93)) = 92 steps an epoch and records a sample rate of 1/92: the plan
    is made for exactly what the accountant records, so a run's reported epsilon never
    passes its target."""
    plan = plan_for(2955, 32, 1, 3, target_epsilon=2.0, delta=1e-5, clip_norm=1.0)
    assert (plan.steps_per_round, plan.sample_rate) == (92, 1 / 92)
    x, y = torch.randn(2955, 1, 4, 4), torch.randint(0, 2, (2955,))
    history: list[tuple[float, float, int]] = []
    for rnd in range(3):
        *_, recorded = train_private(
            _linear(), x, y, plan=plan, criterion=nn.CrossEntropyLoss(),
            make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1), epochs=1,
            batch_size=32, seed=rnd, noise_seed=rnd + 1, device=torch.device("cpu"),
            augment=None, correct=_ce,
        )  # fmt: skip
        history += recorded
    assert history == [(plan.noise_multiplier, plan.sample_rate, 92)] * 3
    assert 1.95 < epsilon_of(history, 1e-5) <= 2.0


def test_each_images_gradient_is_clipped() -> None:
    """One image with a huge gradient moves the weights by at most lr * clip (no noise,
    a batch of one that Poisson sampling always draws); plain SGD moves them far more."""
    x = torch.full((1, 1, 4, 4), 1e4)
    private, plain = _linear(), _linear()
    y = 1 - private(x).argmax(1)  # the class it gets wrong: a gradient as large as x
    before = _flat(private).clone()
    _train(private, x, y, _plan(noise=0.0, clip=0.5))
    moved = float((_flat(private) - before).norm())
    assert 0 < moved <= 0.5 * (1 + 1e-5)
    opt = torch.optim.SGD(plain.parameters(), lr=1.0)
    nn.CrossEntropyLoss()(plain(x), y).backward()
    opt.step()
    assert float((_flat(plain) - before).norm()) > 100 * moved


def test_noise_is_added_and_comes_from_its_own_seed() -> None:
    x, y = torch.randn(20, 1, 4, 4), torch.randint(0, 2, (20,))
    without, noisy, again, other = (_linear() for _ in range(4))
    _train(without, x, y, _plan(noise=0.0))
    _train(noisy, x, y, _plan(noise=1.0))
    _train(again, x, y, _plan(noise=1.0))
    _train(other, x, y, _plan(noise=1.0), noise_seed=2)
    assert not torch.allclose(_flat(without), _flat(noisy))
    assert torch.equal(_flat(noisy), _flat(again))  # same batches, same noise seed
    assert not torch.allclose(_flat(noisy), _flat(other))
    # the model Opacus wrapped is a copy: no hooks are left on the caller's model
    assert not any(m._forward_hooks for m in noisy.modules())


def test_the_ledger_survives_its_process_and_refuses_when_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "privacy-client_0.json"
    ledger = Ledger(path)
    ledger.record([(1.1, 0.25, 4)])
    again = Ledger(path)
    assert again.history == [(1.1, 0.25, 4)] and again.secret == ledger.secret
    again.record([(1.1, 0.25, 4)])
    assert Ledger(path).epsilon(1e-5) == pytest.approx(epsilon_of([(1.1, 0.25, 8)], 1e-5))
    path.write_text("{broken")
    with pytest.raises(RuntimeError, match="cannot tell what it has spent"):
        Ledger(path)


def test_batchnorm_models_are_refused_with_the_ones_that_work() -> None:
    from medbloom.data.registry import spec_of
    from medbloom.models import build_model

    spec = spec_of("pneumoniamnist", 28)
    with pytest.raises(ConfigError, match="use a GroupNorm model: scatternet, cnn, resnet10"):
        check_model(build_model("resnet18", spec, load_weights=False), "resnet18")
    for name in ("scatternet", "cnn", "resnet10"):
        check_model(build_model(name, spec, load_weights=False), name)


BAD = [
    (["--target-epsilon", "0"], "--target-epsilon 0.0 is out of range"),
    (["--delta", "0.5"], "expected a number in (0, 1/n)"),
    (["--delta", "0"], "--delta 0.0 is out of range"),
    (["--clip-norm", "-1"], "--clip-norm -1.0 is out of range"),
    (["--model", "resnet18"], "use a GroupNorm model"),
    (["--strategy", "fedprox"], "FedProx's proximal term"),
    (["--batched", "on"], "--batched on"),
]


@pytest.mark.parametrize(("flags", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_privacy_input_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    root = tmp_path / "data"
    write_npz(root, "pneumoniamnist", counts={"train": 60, "val": 10, "test": 10}, seed=1)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "medbloom", "run", "--data-dir", str(root), "--out", str(out),
         "--num-clients", "2", "--privacy", "sample", *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()


def _hospital_rounds(run_dir: Path) -> dict[str, list[float]]:
    with (run_dir / "clients.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    spent: dict[str, list[float]] = {}
    for r in rows:
        spent.setdefault(r["client_id"], []).append(float(r["epsilon"]))
    return spent


@pytest.mark.slow
def test_a_private_run_states_its_epsilon_and_keeps_counting_across_a_resume(
    tmp_path: Path,
) -> None:
    """Three rounds of DP-SGD, stopped after round 1 and resumed: each hospital's
    epsilon grows round after round (the resumed run does not start again from 0),
    equals the accountant's over the rounds it trained, and ends at most at the
    target; metrics.csv and summary.json carry the largest."""
    from medbloom.federation.simulation import run_simulation

    root = tmp_path / "data"
    write_npz(root, "pneumoniamnist", counts={"train": 90, "val": 20, "test": 20}, seed=1)
    cfg = ExperimentConfig(
        data_dir=str(root), num_clients=2, rounds=3, batch_size=16, min_partition_size=5,
        privacy="sample", target_epsilon=4.0, out=str(tmp_path / "run"),
    ).validate()  # fmt: skip
    run_dir = prepare_run(cfg)
    stop_after_round(cfg, run_dir, 1)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    run_simulation(cfg, run_dir, resume=True)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    spent = _hospital_rounds(run_dir)
    parts = json.loads((run_dir / "partitions.json").read_text())["clients"]
    for client, eps in spent.items():
        assert len(eps) == 3 and eps == sorted(eps) and eps[0] < eps[-1], eps
        n = int(parts[int(client)]["num_train"])
        plan = plan_for(n, 16, 1, 3, 4.0, 1e-5, 1.0)
        step = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        assert eps[-1] == pytest.approx(epsilon_of([step] * 3, 1e-5))
        assert eps[-1] <= 4.0
        ledger = json.loads((run_dir / "hospitals" / f"privacy-client_{client}.json").read_text())
        assert sum(n for _, _, n in ledger["history"]) == 3 * plan.steps_per_round
    largest = max(e[-1] for e in spent.values())
    assert summary["privacy"]["epsilon"] == pytest.approx(largest)
    assert summary["privacy"]["delta"] == 1e-5 and summary["privacy"]["unit"].startswith("image")
    with (run_dir / "metrics.csv").open() as fh:
        last = list(csv.DictReader(fh))[-1]
    assert float(last["epsilon"]) == pytest.approx(largest)
    assert math.isfinite(float(last["auc"]))

    # --model auto under DP-SGD is ScatterNet on a 2D set; it scores images as any model
    # does, and export says in one line why it cannot be exported
    from medbloom.trained import export_model, load_trained

    assert json.loads((run_dir / "config.json").read_text())["config"]["model"] == "scatternet"
    trained = load_trained(run_dir)
    with torch.no_grad():
        probs = torch.softmax(trained.model(torch.zeros(2, 1, 28, 28)), dim=1)
    assert probs.shape == (2, 2) and torch.isfinite(probs).all()
    with pytest.raises(ConfigError, match="scatternet cannot be exported"):
        export_model(trained, "onnx", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_a_run_without_privacy_says_so(tmp_path: Path) -> None:
    from medbloom.cli import summary_lines
    from medbloom.runs import RunRecorder

    cfg = ExperimentConfig(out=str(tmp_path))
    recorder = RunRecorder(tmp_path, cfg, {})
    recorder.close("finished")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["privacy"] == {"mode": "none", "guarantee": "no formal privacy guarantee"}
    assert "privacy: no formal privacy guarantee (--privacy none)" in summary_lines(
        {**summary, "final": {"round": 1, "accuracy": 0.5, "auc": 0.5, "f1": 0.5}}
    )


@pytest.mark.slow
def test_a_hospital_refuses_past_its_own_ceiling_and_the_others_go_on(tmp_path: Path) -> None:
    """Real processes: `medbloom server`, two `medbloom node`s on data of their own, and
    `flwr run` with --privacy sample. Hospital 0's node config holds max-epsilon just
    above what one round spends: it trains round 1, then refuses and says why; the
    server records it as a failed hospital and finishes with hospital 1."""
    import socket
    import time

    from conftest import end_process_groups, flower_cli_env

    bin_dir = Path(sys.executable).parent
    env = flower_cli_env(tmp_path / "flwr-home")

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    counts = {"train": 80, "val": 20, "test": 30}
    write_npz(tmp_path / "server-data", "pneumoniamnist", counts=counts, seed=1)
    for i in range(2):
        write_npz(tmp_path / f"hospital-{i}", "pneumoniamnist", counts=counts, seed=10 + i)
    # each hospital trains on its 72 training images (80 minus local validation)
    plan = plan_for(72, 16, 1, 3, 8.0, 1e-5, 1.0)
    one_round = epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)], 1e-5)
    ceiling = round(one_round * 1.05, 3)

    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, log: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medbloom", *args], env=env, cwd=tmp_path,
            stdout=(tmp_path / log).open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    port = free_port()
    out = tmp_path / "run"
    try:
        server = start(
            "server", "--port", str(port), "--flwr-home", env["FLWR_HOME"], log="server.log"
        )
        deadline = time.monotonic() + 60
        while "Uvicorn running on" not in (tmp_path / "server.log").read_text():
            assert server.poll() is None and time.monotonic() < deadline, "no SuperLink"
            time.sleep(0.3)
        for i in range(2):
            limit = f" max-epsilon={ceiling}" if i == 0 else ""
            start(
                "node", "--superlink", f"127.0.0.1:{port}", "--insecure",
                "--port", str(free_port()), "--node-config",
                f"data-dir='{tmp_path / f'hospital-{i}'}' "
                f"state-dir='{tmp_path / f'hospital-{i}-state'}'{limit}",
                log=f"node_{i}.log",
            )  # fmt: skip
        run = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(Path(__file__).resolve().parents[1]), "medbloom",
             "--stream", "-c",
             f"num-clients=2 min-clients=1 rounds=3 batch-size=16 privacy='sample' "
             f"data-dir='{tmp_path / 'server-data'}' out='{out}'"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        deadline = time.monotonic() + 60
        while not (out / "summary.json").exists() or (
            json.loads((out / "summary.json").read_text())["status"] == "running"
        ):
            assert time.monotonic() < deadline, "the run did not end"
            time.sleep(0.5)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "finished", summary.get("error")
        with (out / "clients.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        by_round = {r: [x for x in rows if x["round"] == r] for r in ("1", "2", "3")}
        assert [x["status"] for x in by_round["1"]] == ["ok", "ok"]
        refused = [x for x in by_round["2"] if x["status"] == "failed"]
        assert len(refused) == 1, by_round["2"]
        assert "refuses round 2" in refused[0]["error"], refused[0]["error"]
        assert f"max-epsilon={ceiling:g}" in refused[0]["error"], refused[0]["error"]
        assert [x["status"] for x in by_round["3"]] == ["ok"]
        ledgers = [
            json.loads((tmp_path / f"hospital-{i}-state" / "privacy-own-data.json").read_text())
            for i in range(2)
        ]
        assert [len(ledger["history"]) for ledger in ledgers] in ([1, 1], [1, 3], [3, 1])
        steps = [sum(n for _, _, n in ledger["history"]) for ledger in ledgers]
        assert sorted(steps) == [plan.steps_per_round, 3 * plan.steps_per_round]
        assert not (out / "hospitals").exists()  # what a hospital keeps stays with it
        assert summary["privacy"]["epsilon"] <= 8.0
    except BaseException:
        for log in sorted(tmp_path.glob("*.log")):
            print(f"----- {log.name} -----\n{log.read_text()[-3000:]}")
        raise
    finally:
        end_process_groups(procs)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "fedadam"], "use fedavg or fedprox"),
        (["--fraction-train", "0.5"], "use --fraction-train 1"),
        (["--num-clients", "3", "--delta", "0.5"], "below 1/3 hospitals"),
    ],
    ids=["strategy", "fraction", "delta"],
)
def test_bad_hospital_privacy_input_is_one_line(flags: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "medbloom", "run", "--privacy", "hospital", *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_hospital_level_privacy_uses_flowers_wrapper_and_accountant_across_a_resume(
    tmp_path: Path,
) -> None:
    """--privacy hospital: Flower's server-side fixed clipping wrapper with its
    RdpAccountant, the noise calibrated to spend the target over the planned rounds.
    Stopped after round 1 and resumed, the accountant goes on from its checkpoint:
    epsilon after round r is the accountant's for r releases."""
    from medbloom.federation.simulation import run_simulation
    from medbloom.federation.strategies import build_strategy
    from medbloom.privacy import hospital_epsilon

    root = tmp_path / "data"
    write_npz(root, "pneumoniamnist", counts={"train": 90, "val": 20, "test": 20}, seed=1)
    cfg = ExperimentConfig(
        data_dir=str(root), num_clients=2, rounds=3, batch_size=16, min_partition_size=5,
        privacy="hospital", target_epsilon=6.0, clip_norm=2.0, out=str(tmp_path / "run"),
    ).validate()  # fmt: skip
    strategy = build_strategy(cfg)
    assert type(strategy).__name__ == "DifferentialPrivacyServerSideFixedClipping"
    noise = strategy.noise_multiplier
    assert hospital_epsilon(cfg, noise, 3) <= 6.0 < hospital_epsilon(cfg, noise * 0.99, 3)
    run_dir = prepare_run(cfg)
    stop_after_round(cfg, run_dir, 1)
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert "privacy_accountant" in ckpt
    run_simulation(cfg, run_dir, resume=True)
    with (run_dir / "metrics.csv").open() as fh:
        eps = [float(r["epsilon"]) for r in csv.DictReader(fh)]
    assert eps[0] == 0.0
    assert eps[1:] == pytest.approx([hospital_epsilon(cfg, noise, r) for r in (1, 2, 3)])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["privacy"]["mode"] == "hospital" and summary["privacy"]["epsilon"] <= 6.0
