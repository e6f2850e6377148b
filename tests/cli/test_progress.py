"""cli/progress.py: nothing for a short wait, plain lines on a pipe, rich on a terminal."""

from __future__ import annotations

import contextlib
import io
import time

import pytest

from minidisk.cli.progress import ENV, Progress


def _waited(seconds: float, *, plain: bool = True, fail: bool = False) -> str:
    stream = io.StringIO()
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        with Progress("copying", total=10, unit=" MiB", delay=0.05, plain=plain,
                      stream=stream) as progress:
            progress.update(3)
            time.sleep(seconds)
            if fail:
                raise RuntimeError("broken")
    return stream.getvalue()


def test_a_short_wait_shows_nothing() -> None:
    assert _waited(0) == ""


def test_a_long_wait_gets_a_line_when_it_shows_and_one_when_it_ends() -> None:
    lines = _waited(0.3).splitlines()
    assert lines[0] == "minidisk: copying: 3/10 MiB (30%)"
    assert lines[-1].startswith("minidisk: copying: done after ")
    assert lines[-1].endswith(" s")
    assert _waited(0.3, fail=True).splitlines()[-1].startswith(
        "minidisk: copying: failed after ")


def test_commands_whose_stderr_is_a_contract_stay_quiet_off_a_terminal() -> None:
    assert _waited(0.3, plain=False) == ""


def test_the_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "never")
    assert _waited(0.3) == ""
