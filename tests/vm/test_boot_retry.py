"""The boot fixture's one retry: a guest whose kernel panicked (or reported a crash and
hung) before its script finished gets one fresh boot (6.1 under TCG does either now and
then on its own), and says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.vm.harness import Boot


def test_a_guest_whose_kernel_panics_gets_one_fresh_boot(
        boot: Boot, tmp_path_factory: pytest.TempPathFactory) -> None:
    # The first boot leaves a mark in its results and crashes its kernel; the second finds
    # the mark (the host's file system is visible, read-only, in every guest) and finishes.
    script = """
first=$(ls -d "$(dirname "$RESULTS")"/vm-panics-once[0-9]*/panicked 2>/dev/null)
if [ -n "$first" ]; then echo "second boot, after $first"; exit 0; fi
touch "$RESULTS/panicked"; sync
echo c > /proc/sysrq-trigger
sleep 60
"""
    run = boot("panics-once", script, timeout=300)
    assert run.status == 0 and "second boot" in run.output, run.explain()
    assert Path(run.results).name.startswith("vm-panics-once-again")
    boots = (tmp_path_factory.getbasetemp() / "vm-boots.txt").read_text()
    assert "panics-once (again: the first boot's kernel crashed)" in boots


def test_a_guest_that_hangs_after_its_kernel_reports_a_crash_is_ended_and_booted_again(
        boot: Boot, tmp_path_factory: pytest.TempPathFactory) -> None:
    # As 6.1 did in a CI run ("BUG: Bad page state", then nothing for 15 minutes): the
    # kernel log shows a crash and the script never ends. The guest is killed crash_grace
    # seconds later, not at its timeout, and booted once more.
    script = """
first=$(ls -d "$(dirname "$RESULTS")"/vm-hangs-once[0-9]*/hung 2>/dev/null)
if [ -n "$first" ]; then echo "second boot, after $first"; exit 0; fi
touch "$RESULTS/hung"; sync
echo "BUG: injected by the test" > /dev/kmsg
sleep 600
"""
    run = boot("hangs-once", script, timeout=300, crash_grace=5)
    assert run.status == 0 and "second boot" in run.output, run.explain()
    boots = (tmp_path_factory.getbasetemp() / "vm-boots.txt").read_text()
    first = next(line for line in boots.splitlines() if line.startswith("hangs-once: "))
    assert float(first.split()[1]) < 120, first  # ended soon after the crash, not at 300 s
