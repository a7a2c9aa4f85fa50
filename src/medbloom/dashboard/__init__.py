"""The live dashboard: a Streamlit app that reads run directories, and its launcher.

``launch`` starts ``streamlit run`` on :mod:`medbloom.dashboard.app` as a child
process and waits for it. Nothing here imports Streamlit, torch or Flower: the app
runs in its own process and only reads files (see :mod:`medbloom.dashboard.rundir`).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from medbloom.errors import MedbloomError
from medbloom.system import run_forwarding_signals

APP = Path(__file__).with_name("app.py")
DEFAULT_PORT = 8501

__all__ = ["APP", "DEFAULT_PORT", "check_port", "dashboard_command", "launch"]


def dashboard_command(runs_dir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """The ``streamlit run`` command line that serves the dashboard for ``runs_dir``."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        # A viewer's menu: no "Deploy" button or developer options.
        "--client.toolbarMode",
        "viewer",
        # The app's source never changes under a user: watching it only costs CPU.
        "--server.fileWatcherType",
        "none",
        "--",
        "--runs",
        str(runs_dir),
    ]


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """Raise :class:`MedbloomError` unless ``host:port`` is a valid, free address."""
    if not 1 <= port <= 65535:
        raise MedbloomError(f"--port {port} is out of range: expected 1 to 65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise MedbloomError(
                f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); pick another port"
            ) from None


def launch(runs_dir: Path, port: int, host: str = "127.0.0.1") -> int:
    """Serve the dashboard for ``runs_dir`` on ``http://host:port`` until it stops.

    Returns the server's exit code (128 + N if signal N ended it; 143 when this
    process got SIGTERM). Ctrl-C or SIGTERM stops it: the signal is passed on to the
    server, which shuts down cleanly.
    ``runs_dir`` need not exist yet: the dashboard says so and shows runs as soon
    as they appear.
    """
    runs_dir = Path(runs_dir).expanduser().absolute()
    if runs_dir.exists() and not runs_dir.is_dir():
        raise MedbloomError(f"--runs {runs_dir}: not a folder")
    check_port(port, host)
    print(f"medbloom dashboard: http://{host}:{port} (runs in {runs_dir}); Ctrl-C stops it")
    # Ctrl-C and SIGTERM go on to Streamlit, which shuts down cleanly; it never
    # outlives this command
    return run_forwarding_signals(dashboard_command(runs_dir, port, host))
