"""Run a coroutine inline until it first waits, and only then as an asyncio Task.

Most NBD requests on memory devices (and dm targets over them) never wait: creating a Task
for each would cost more than the request. `run_inline` steps the coroutine by hand; if it
finishes, no Task ever existed; if it suspends, a Task continues it from that very point.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


def run_inline(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None],
               tasks: set[asyncio.Task[None]]) -> None:
    """Step `coro` now; if it suspends, finish it in a Task held in `tasks` until done."""
    try:
        first = coro.send(None)
    except StopIteration:
        return
    task = loop.create_task(_resume(coro, first))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


class _Resume:
    """Continue a coroutine, already stepped once by hand, inside a Task.

    The first `send(None)` happened inline; what it yielded (an asyncio future) is yielded
    on to the Task, which then drives the rest exactly as if it had started it.
    """

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, None]:
        value = self.first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # cancellation and friends go to the coroutine
                try:
                    value = self.coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = self.coro.send(sent)
                except StopIteration:
                    return


async def _resume(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _Resume(coro, first)
