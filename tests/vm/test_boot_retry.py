"""The boot fixture's one retry: a guest whose kernel panicked before its script finished
gets one fresh boot (6.1 under TCG panics now and then on its own), and says so."""

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
    assert "panics-once (again: the first boot's kernel panicked)" in boots
