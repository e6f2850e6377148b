"""The autofs tests, in a guest, when this machine's kernel has no autofs.

`/vmlink` is made of the kernel's autofs: the tests marked `autofs` (tests/link) mount it for
real. Some machines of this kind boot a kernel without it (no autofs in /proc/filesystems, no
module to load), so there tests/conftest.py deselects them and this test runs the same tests,
unchanged, under Debian 12's kernel in one guest, whose autofs4 module loads. Where the host
kernel has autofs the tests run on the host and this one is deselected instead: every autofs
test runs exactly once either way, and none is skipped.

The interpreter and the virtualenv reach the guest on ext4 images over virtio-blk
(pyimage.py): over 9p alone each `minidisk` process the tests start spent most of a minute
importing.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from tests.harness import ROOT
from tests.vm.harness import Boot

pytestmark = [pytest.mark.vm, pytest.mark.autofs_guest,
              pytest.mark.timeout(2500)]

# Its own unit of work (tests/guest_scheduling.py): this guest runs beside the kernel-nbd ones
# instead of after them, so the suite's wall time is the longer of the two, not their sum.
# One boot running every autofs test, under TCG: 1101 s of pytest alone here (8 tests and an
# xfail, beside other work); twice that on a CI run that shares the cores with the other
# guests (stop 24 reached 1400 s).
GUEST_TIMEOUT = 2400.0
TIME_SCALE = 10  # the tests' own bounds, in a guest where Python runs ~20x slower


def test_autofs_tests_pass_under_debians_kernel(boot: Boot) -> None:
    script = "for m in autofs4 fuse loop; do modprobe $m || exit 98; done\n" + f"""
export PYTHONDONTWRITEBYTECODE=1 MINIDISK_TEST_TIME_SCALE={TIME_SCALE}
cd {ROOT}
"$PYTHON" -m pytest -p no:cacheprovider -n 0 -q -o faulthandler_timeout=0 -m autofs --durations=0 \\
    --junitxml="$RESULTS/junit.xml" tests/link tests/test_readme.py > "$RESULTS/pytest.txt" 2>&1
"""
    # The README's /vmlink: the guest's root is the host's, read-only, so its mount point is
    # made here (and removed afterwards if it was not there).
    vmlink = Path("/vmlink")
    made = not vmlink.exists()
    if made:
        vmlink.mkdir(mode=0o755)
    try:
        # /etc/minidisk and /var/lib/minidisk, which the README's chains get fresh, need
        # not exist on the host: the guest sees /etc and /var/lib through writable
        # overlays, where the chains can make them (nothing reaches the host).
        run = boot("autofs", script, timeout=GUEST_TIMEOUT, python=True,
                   vng_args=["--overlay-rwdir=/etc", "--overlay-rwdir=/var/lib"])
    finally:
        if made:
            vmlink.rmdir()
    report = run.results / "pytest.txt"
    output = report.read_text(errors="replace") if report.exists() else run.explain()
    junit = run.results / "junit.xml"
    assert junit.exists(), f"pytest in the guest left no report\n{output[-6000:]}"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors")}
    # junit files an xfail (a known open bug, its reason in the test) as skipped: only a real
    # skip counts against the run.
    counts["skipped"] = sum(1 for skip in suite.iter("skipped")
                            if skip.get("type") != "pytest.xfail")
    assert counts["tests"] > 0, f"no autofs test ran in the guest\n{output[-6000:]}"
    assert (counts["failures"], counts["errors"], counts["skipped"]) == (0, 0, 0), \
        f"{counts}\n{output[-12000:]}"
    assert run.status == 0, output[-6000:]

