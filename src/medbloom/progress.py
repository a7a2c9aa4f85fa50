"""Progress of long work (decoding, downloading, hashing) that suits where it is shown.

On a terminal it is tqdm's bar. Anywhere else (a log file, a pipe, a scheduler's
capture) a bar's carriage-return updates pile up into hundreds of fragments, so there
it is a plain line every :data:`LINE_EVERY` seconds and one when the work ends.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any

LINE_EVERY = 10.0


class LineProgress:
    """tqdm's ``update``/context-manager interface, printing whole lines."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        stream: IO[str],
        every: float = LINE_EVERY,
        scale: bool = False,
    ) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.every, self.scale = every, scale
        self.n = 0
        self.started = self.last = time.monotonic()

    def _amount(self, n: float) -> str:
        if not self.scale:
            return f"{int(n)}"
        for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if n >= factor:
                return f"{n / factor:.1f} {prefix}"
        return f"{int(n)} "

    def _line(self) -> None:
        done = self._amount(self.n)
        if self.total:
            text = f"{done}/{self._amount(self.total)}{self.unit} ({self.n / self.total:.0%})"
        else:
            text = f"{done}{self.unit}"
        seconds = time.monotonic() - self.started
        print(f"{self.desc}: {text}, {seconds:.0f} s", file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            self._line()


def progress_bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    scale: bool = False,
    stream: IO[str] | None = None,
) -> Any:
    """A progress bar on a terminal, a line every few seconds elsewhere, nothing when not
    ``enabled``. Use as a context manager with ``update(n)``."""
    out = stream if stream is not None else sys.stderr
    if enabled and out.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, file=out)
    if enabled:
        return LineProgress(total, desc, f" {unit}" if not scale else unit, out, scale=scale)
    from tqdm import tqdm

    return tqdm(total=total, disable=True)
