"""Progress where a person waits: rich's live display on a terminal, plain lines otherwise.

    with Progress("making an ext4 file system on /dev/loop0") as progress:
        ...                                  # progress.update(done, total) where it is known

Nothing shows for a wait shorter than `delay` (1 s): a lock granted at once or a quick mkfs
prints nothing, so scripts see the same output as before. After that, on a terminal (stderr
is a TTY and TERM is not "dumb") a rich spinner, the label, a bar when the total is known
and the elapsed time are drawn and erased again at the end; otherwise one line when the wait
begins to show, one every `PLAIN_EVERY` seconds while it lasts, and one when it ends, all
on stderr, so that stdout stays what scripts parse. Commands whose stderr is a contract too
(dmsetup's, replay-log's) pass `plain=False`: they show progress on a terminal only.
MINIDISK_PROGRESS=never turns it off, =plain forces the plain lines, =tty rich's display.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

ENV = "MINIDISK_PROGRESS"
DELAY = 1.0  # seconds a wait lasts before it shows
PLAIN_EVERY = 5.0  # seconds between plain lines


def _style(stream: TextIO) -> str:
    """"tty", "plain" or "never", from MINIDISK_PROGRESS or the stream."""
    chosen = os.environ.get(ENV, "")
    if chosen in ("tty", "plain", "never"):
        return chosen
    if stream.isatty() and os.environ.get("TERM", "") != "dumb":
        return "tty"
    return "plain"


class Progress:
    """One wait a person may watch; see the module docstring. Thread-safe `update`."""

    def __init__(self, label: str, *, total: float | None = None, unit: str = "",
                 delay: float = DELAY, plain: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0.0
        self.unit = unit
        self.delay = delay
        self.stream = stream if stream is not None else sys.stderr
        style = _style(self.stream)
        self.style = "never" if style == "plain" and not plain else style
        self.started = 0.0  # set on entering
        self.shown = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._rich: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        self.started = time.monotonic()
        if self.style != "never":
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self._rich is not None:
                self._rich.stop()
            if self.shown and self.style == "plain":
                outcome = "done" if kind is None else "failed"
                self._line(f"{outcome} after {self._elapsed()}")

    def update(self, done: float, total: float | None = None) -> None:
        """How far it is: `done` of `total` (units of the caller's choosing)."""
        with self._lock:
            self.done = done
            if total is not None:
                self.total = total
            if self._rich is not None:
                self._rich.update(self._task, completed=done, total=self.total)

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.started:.1f} s"

    def _figures(self) -> str:
        if self.total:
            return f"{self.done:g}/{self.total:g}{self.unit} ({100 * self.done / self.total:.0f}%)"
        return f"{self.done:g}{self.unit}" if self.done else ""

    def _line(self, text: str) -> None:
        print(f"minidisk: {self.label}: {text}", file=self.stream, flush=True)

    def _tick(self) -> None:
        if self._stop.wait(self.delay):
            return
        with self._lock:
            self.shown = True
            if self.style == "tty":
                self._start_rich()
                return  # rich's own thread redraws it from here on
            figures = self._figures()
            print(f"minidisk: {self.label}" + (f": {figures}" if figures else ""),
                  file=self.stream, flush=True)
        while not self._stop.wait(PLAIN_EVERY):
            with self._lock:
                self._line(" ".join(filter(None, [self._elapsed(), self._figures()])))

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
        if self.total:
            columns += [BarColumn(), TextColumn("{task.percentage:>3.0f}%")]
        columns.append(TimeElapsedColumn())
        self._rich = RichProgress(*columns, console=Console(file=self.stream),
                                  transient=True)
        self._rich.start()
        self._task = self._rich.add_task(self.label, total=self.total, completed=self.done)
