"""Progress of a stream's consumer: what a callback is told, and a ready-made bar.

::

    with progress_bar(total=len(pages), desc="pages") as bar:
        stream = OrderedResultStream(app, progress=bar)
        for html in stream.map(render, pages):
            out.write(html)

The bar is tqdm's when tqdm is installed (``pip install
'celery-ordered[progress]'``) and the output is a terminal; otherwise a plain
text bar that redraws in place on a terminal and prints a line every 10%
elsewhere (logs, CI); while the total is unknown, at 1, 2, 5, 10, 20, 50, ...
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Literal

from . import checks

__all__ = ["Progress", "ProgressBar", "progress_bar"]

Backend = Literal["auto", "tqdm", "text"]


@dataclass(frozen=True)
class Progress:
    """Where a stream's consumer is: passed to the ``progress=`` callback.

    Counts are stream positions: every task and every marker put counts once
    (a chunk of :meth:`~celery_ordered.OrderedResultStream.map` with
    ``chunksize`` counts once), and a failed task counts like any other.
    """

    #: Outcomes handed out so far: the position after the latest one.
    delivered: int
    #: How many the stream will hold in all: known once it is closed, else None.
    total: int | None
    #: Seconds since this consumer was created.
    elapsed: float
    #: Outcomes per second this consumer has handed out.
    rate: float

    @property
    def fraction(self) -> float | None:
        """``delivered / total`` (None while the total is unknown)."""
        if self.total is None:
            return None
        return 1.0 if self.total == 0 else min(1.0, self.delivered / self.total)


class ProgressBar:
    """A progress bar fed by :class:`Progress` updates; a ``progress=`` callback.

    Use it as a context manager (or call :meth:`close`) so the bar ends
    cleanly. ``total`` fixes the bar's length up front; without it, the bar
    learns the total when the stream is closed. :meth:`update` moves it by
    hand, for callers that count something other than stream positions.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        desc: str = "tasks",
        file: IO[str] | None = None,
        backend: Backend = "auto",
        width: int = 30,
    ) -> None:
        total = checks.count("total", total, minimum=0, none=True, type_error=True)
        if backend not in ("auto", "tqdm", "text"):
            raise ValueError(f"backend must be 'auto', 'tqdm' or 'text', got {backend!r}")
        self.total = total
        self.desc = desc
        self.file: IO[str] = file if file is not None else sys.stderr
        self._tty = _isatty(self.file)
        self.width = width
        self._lock = threading.Lock()
        self._done = 0
        # The rate counts from the first update: a bar that joins a stream
        # half done shows how fast it goes now, not since it began.
        self._began: float | None = None
        self._done_at_start = 0
        self._last_draw = 0.0
        self._last_decile = -1
        self._last_printed = -1
        self._closed = False
        self._tqdm: Any = None
        if backend == "tqdm" or (backend == "auto" and self._tty):
            try:
                from tqdm import tqdm
            except ImportError:
                if backend == "tqdm":
                    raise ImportError(
                        "progress_bar(backend='tqdm') needs tqdm: pip install "
                        "'celery-ordered[progress]'"
                    ) from None
            else:
                self._tqdm = tqdm(total=total, desc=desc, unit=" " + desc, file=self.file)

    def __call__(self, progress: Progress) -> None:
        """Take one update from a stream (the ``progress=`` callback)."""
        if self.total is None and progress.total is not None:
            self.set_total(progress.total)
        self.update(progress.delivered)

    def set_total(self, total: int) -> None:
        """Change the bar's length, for a total that grows or becomes known."""
        with self._lock:
            self.total = total
            if self._tqdm is not None and not self._closed:
                self._tqdm.total = total
                self._tqdm.refresh()

    def update(self, done: int) -> None:
        """Show ``done`` items finished."""
        with self._lock:
            if self._closed:
                return
            if self._began is None:
                self._began = time.monotonic()
                self._done_at_start = self._done = done
                if self._tqdm is not None:
                    self._tqdm.initial = self._tqdm.n = done
                    self._tqdm.refresh()
            if self._tqdm is not None:
                if done > self._done:
                    self._tqdm.update(done - self._done)
                self._done = max(self._done, done)
                return
            self._done = done
            self._draw(final=False)

    def say(self, line: str) -> None:
        """Print ``line`` above the bar without breaking it."""
        with self._lock:
            if self._tqdm is not None:
                self._tqdm.write(line, file=self.file)
                return
            if self._tty:
                self.file.write("\r\x1b[K")
            self.file.write(line + "\n")
            self.file.flush()
            self._last_draw = 0.0

    def close(self) -> None:
        """End the bar (idempotent): the final state is shown once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._tqdm is not None:
                self._tqdm.close()
                return
            self._draw(final=True)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def text(self) -> str:
        """The plain bar for the current state, e.g. ``[####......] 40/100 tasks 12/s``."""
        elapsed = 0.0 if self._began is None else time.monotonic() - self._began
        rate = (self._done - self._done_at_start) / elapsed if elapsed > 0 else 0.0
        if self.total:
            filled = min(self.width, self.width * self._done // self.total)
            shown = f"{self._done}/{self.total}"
        else:
            filled = self.width if self.total == 0 else 0
            shown = f"{self._done}/?" if self.total is None else "0/0"
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {shown} {self.desc} {rate:,.0f}/s"

    def _draw(self, *, final: bool) -> None:
        now = time.monotonic()
        if self._tty:
            if final or now - self._last_draw > 0.05:
                self.file.write("\r" + self.text() + ("\n" if final else ""))
                self.file.flush()
                self._last_draw = now
            return
        # Not a terminal: a line at each 10% step, and the final state once;
        # with no total yet, at each step of 1, 2, 5, 10, 20, 50, ... done.
        decile = 10 * self._done // self.total if self.total else _step(self._done)
        if (final and self._done != self._last_printed) or (
            decile >= 0 and decile != self._last_decile
        ):
            self._last_decile = decile
            self._last_printed = self._done
            self.file.write(self.text() + "\n")
            self.file.flush()


def _step(done: int) -> int:
    """Which of the steps 1, 2, 5, 10, 20, 50, ... ``done`` has reached (-1: none)."""
    if done < 1:
        return -1
    power, at = 0, 1
    while at * 10 <= done:
        at *= 10
        power += 1
    lead = 5 if done >= 5 * at else 2 if done >= 2 * at else 1
    return 3 * power + {1: 0, 2: 1, 5: 2}[lead]


def progress_bar(
    total: int | None = None,
    *,
    desc: str = "tasks",
    file: IO[str] | None = None,
    backend: Backend = "auto",
) -> ProgressBar:
    """A :class:`ProgressBar` to pass as a stream's ``progress=`` callback.

    ``backend="auto"`` uses tqdm when it is installed and ``file`` (default:
    stderr) is a terminal, else the plain text bar; ``"tqdm"`` insists on
    tqdm, ``"text"`` on the plain bar.
    """
    return ProgressBar(total, desc=desc, file=file, backend=backend)


def _isatty(file: IO[str]) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False
