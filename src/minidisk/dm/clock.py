"""The time that targets read: flakey's up and down intervals, delay's holds.

Injected (`clock=` when a target is built) so that a test drives time itself and checks
what a target does at each moment, instead of sleeping and hoping a loaded machine kept up.
The registry builds targets without one, and they read `MONOTONIC`: time.monotonic and the
running event loop's timers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary start; never goes back."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` on the event loop `delay` seconds from now (unless cancelled)."""
        ...


class _Monotonic:
    def monotonic(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)


MONOTONIC: Clock = _Monotonic()
