"""The server's process: Flower's own ``flower-superlink``, with its HTTP middleware
applied only to the routes it acts on (see
:func:`medbloom.federation.flower_internals.gate_superlink_middleware`).

``python -m medbloom.federation.superlink`` (what ``medbloom launch`` and
``medbloom server`` start) takes the same flags as ``flower-superlink``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import medbloom  # noqa: F401  (sets Flower's offline environment first)
from medbloom.federation import flower_internals
from medbloom.system import ablated


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``flower-superlink`` with the arguments given, its middleware gated."""
    if not ablated("gates"):
        flower_internals.gate_superlink_middleware()
    flower_internals.run_superlink(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
