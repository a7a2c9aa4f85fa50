"""Run an experiment in this process on Flower's Simulation Engine (Ray)."""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from medbloom.config import ExperimentConfig
from medbloom.experiment import largest_first
from medbloom.federation.client_app import make_client_app
from medbloom.federation.server_app import RoundCallback, make_server_app
from medbloom.system import usable_cpus


def backend_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """One CPU per simulated client, so clients train in parallel, one per core."""
    cpus = usable_cpus()
    gpus = 1 if cfg.device in ("cuda", "auto") and _cuda() else 0
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.25 if gpus else 0.0},
        "init_args": {
            # a Ray instance of this run's own, also where a cluster runs (`ray start`
            # writes its address where ray.init would otherwise find and join it)
            "address": "local",
            "num_cpus": cpus,
            "num_gpus": gpus,
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": True,
        },
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_simulation(
    cfg: ExperimentConfig,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    stop: threading.Event | None = None,
    resume: bool = False,
    client_app: ClientApp | None = None,
    shield_ray: bool = False,
) -> None:
    """Run every round; return when the Simulation Engine and Ray have shut down.

    Setting ``stop`` ends the run at the next poll for replies; the run directory
    then says ``interrupted`` and :class:`RunInterrupted` is raised here.

    ``shield_ray`` (the ``medbloom`` command) starts Ray's processes with SIGTERM
    blocked, as Ray blocks SIGINT in them: a SIGTERM to the whole process group
    (``timeout``, ``systemd``, a container's stop) then reaches only medbloom, which
    stops the run cleanly and shuts Ray down after it. Unshielded, Ray's raylet died at
    once and took the driver with it (exit code 1, the run left "running") whenever
    the driver touched Ray before its records were closed. The price: Ray's shutdown
    waits 1 s for each of its processes to ignore SIGTERM before it kills them (about
    4 s a run, measured), so runs within one process (tests) go unshielded.
    """
    from flwr.simulation import run_simulation as flwr_run_simulation

    server = make_server_app(cfg, run_dir, on_round, stop, resume)
    client = client_app or make_client_app(cfg, slot_order=largest_first(cfg))
    config = backend_config(cfg)
    _start_ray_keeping_signal_handlers(config["init_args"], shield_ray)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        flwr_run_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=cfg.num_clients,
            backend_config=config,
        )


def _start_ray_keeping_signal_handlers(init_args: dict[str, Any], shield: bool = False) -> None:
    """Start Ray as Flower's Simulation Engine would (it then finds Ray running and
    uses it), and put back this process's SIGTERM and SIGINT handlers, which
    ``ray.init`` replaces with its own (SIGTERM: exit at once, bypassing medbloom's
    clean stop). Without this, SIGTERM from a scheduler, ``systemd`` or ``timeout``
    did not stop a run, or aborted it with the run directory saying "running"."""
    import os
    import signal
    import sys

    import ray

    if ray.is_initialized() or threading.current_thread() is not threading.main_thread():
        return
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    # what Flower's Ray backend passes: its workers see this process's sys.path
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    # Ray's processes (GCS, raylet, and the workers the raylet starts) inherit this
    # thread's signal mask; a SIGTERM to this process while Ray starts waits until it
    # has started. They end with this process in any case (Ray's fate sharing).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM} if shield else set())
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    for s, handler in handlers.items():
        if handler is not None:
            signal.signal(s, handler)
