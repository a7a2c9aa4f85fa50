"""medbloom: federated learning for medical image classification on Flower and PyTorch."""

from __future__ import annotations

import os

# Flower phones home (telemetry, update check) and may build a fresh environment for
# an App (pulling a CUDA torch) unless told not to. Every process that imports
# medbloom, including Ray actors and Flower's app processes, inherits these.
_FLOWER_OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Keeps Ray on 127.0.0.1 instead of every interface.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    # Silences a FutureWarning Ray prints in every run that uses no GPU.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Ray's C++ failure-signal handler takes SIGTERM from the process that starts Ray
    # and aborts it (exit 134, a stack dump, summary.json left "running"); without it
    # SIGTERM reaches medbloom's own handler and stops the run as Ctrl-C does.
    "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
}
for _key, _value in _FLOWER_OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"

from medbloom.errors import MedbloomError  # noqa: E402

__all__ = ["MedbloomError", "__version__"]
