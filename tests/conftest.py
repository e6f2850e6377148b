"""Hooks and fixtures shared by every test area (each area keeps its own in
tests/<area>/conftest.py; helpers that tests import live in tests/harness.py)."""

from __future__ import annotations

import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings
from tests import harness

from minidisk.link.autofs import kernel_has_autofs

if TYPE_CHECKING:
    from tests.guest_scheduling import GuestUnits
    from xdist.remote import Producer

# Hypothesis's per-example deadline (200 ms) and its too-slow health check are timings: on two
# cores shared with guests they fail tests whose code is right. Examples still run in full.
settings.register_profile("minidisk", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("minidisk")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory for unix sockets (harness.short_dir), removed at teardown."""
    directory = harness.short_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test shows the log tail of every process it (or its fixtures) left running."""
    report = yield
    if report.failed:
        for process in harness.live():
            if text := process.log_text()[-harness.LOG_TAIL:]:
                report.sections.append((f"log of pid {process.pid} ({process.log})", text))
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    harness.stop_all()  # a server no fixture stopped must not outlive the run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every autofs test runs once: here if this kernel has autofs, else in a guest.

    Machines of this kind may boot a kernel without autofs; tests/vm/test_autofs_guest.py then
    runs the `autofs` tests under Debian's kernel, and is itself deselected where they can run
    here.
    """
    if harness.TIME_SCALE != 1:  # pytest-timeout takes the closest marker: put the scaled one first
        for item in items:
            marker = item.get_closest_marker("timeout")
            seconds = marker.args[0] if marker is not None and marker.args else None
            seconds = seconds if seconds is not None else config.getini("timeout")
            item.add_marker(pytest.mark.timeout(harness.scaled(float(seconds))), append=False)
    unwanted = "autofs_guest" if kernel_has_autofs() else "autofs"
    dropped = [item for item in items if item.get_closest_marker(unwanted) is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item.get_closest_marker(unwanted) is None]


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> GuestUnits | None:
    """Guest modules whole and first (guest_scheduling.py says why); other --dist modes are
    xdist's own."""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from tests.guest_scheduling import GuestUnits

    return GuestUnits(config, log)
