"""Fixtures for tests that boot Debian 12's kernel in a guest (harness.py says how).

These tests never skip: a machine that runs scripts/bootstrap.sh can boot the guest, so a
missing kernel, qemu or virtme-ng is a failure that names the missing step. A boot takes
seconds under TCG, so a test module boots once (a module-scoped fixture running one script
that leaves many rows) and its tests read the rows. tests/guest_scheduling.py hands all VM
modules to one worker, first, so one guest runs at a time while the other worker runs the rest
of the suite.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from tests.harness import ROOT
from tests.vm.harness import (
    Boot,
    GuestRun,
    Kernel,
    find_kernel,
    kernel_crash,
    kvm_problem,
    run_in_guest,
)
from tests.vm.pyimage import python_images

BOOT_TIMEOUT = 900.0  # seconds for one boot and its script, under TCG on a loaded machine


@pytest.fixture(scope="session")
def guest_kernel() -> Kernel:
    return find_kernel()


@pytest.fixture(scope="session")
def use_kvm(guest_kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> bool:
    problem = kvm_problem(guest_kernel, tmp_path_factory.mktemp("kvm-probe"))
    log = tmp_path_factory.getbasetemp() / "vm-boots.txt"
    with open(log, "a") as f:
        f.write(f"kvm: {'yes' if problem is None else f'no, TCG ({problem})'}\n")
    return problem is None


@pytest.fixture(scope="session")
def boot(guest_kernel: Kernel, use_kvm: bool, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    """`boot(name, script)` → the GuestRun of `script` (bash) in a fresh guest.

    With `python=True` the interpreter, the virtualenv and the checkout reach the guest on
    ext4 images over virtio-blk instead of 9p (pyimage.py): every `minidisk` the script starts
    imports ~5x faster. Boot times go to vm-boots.txt in pytest's base temporary directory.
    """
    def run(name: str, script: str, timeout: float = BOOT_TIMEOUT,
            vng_args: Sequence[str] = (), python: bool = False,
            crash_grace: float = 60.0) -> GuestRun:
        results = tmp_path_factory.mktemp(f"vm-{name}")
        if python:  # a script that runs minidisk: its Python from virtio disks (pyimage.py)
            images = python_images(ROOT / ".cache" / "vm-images", results / "checkout.img")
            script = images.mount_script + script
            vng_args = [*vng_args, *images.vng_args()]
        guest = run_in_guest(script, results, kernel=guest_kernel, kvm=use_kvm, timeout=timeout,
                             vng_args=vng_args, crash_grace=crash_grace)
        log(name, guest)
        crash = kernel_crash(guest.console) if guest.status is None else ""
        if crash:
            # 6.1 under TCG sometimes panics on its own (seen: "corrupted stack end detected
            # inside scheduler" in 9p's client, with no dm or nbd on the stack), or finds its
            # memory corrupt and hangs ("BUG: Bad page state"; the harness ends such a guest
            # crash_grace seconds later): that boot says nothing of the script, so it gets
            # one fresh guest. Two crashes fail.
            first = guest
            results = tmp_path_factory.mktemp(f"vm-{name}-again")  # the images are read-only
            guest = run_in_guest(script, results, kernel=guest_kernel, kvm=use_kvm,
                                 timeout=timeout, vng_args=vng_args,
                                 crash_grace=crash_grace)
            log(f"{name} (again: the first boot's kernel crashed)", guest)
            if guest.status is None:
                pytest.fail(f"guest {name} did not finish its script twice; the first "
                            f"kernel crashed:\n{crash}\n{guest.explain()}\n"
                            f"--- first boot ---\n{first.explain()}")
        if guest.status is None:
            pytest.fail(f"guest {name} did not finish its script\n{guest.explain()}")
        return guest

    def log(name: str, guest: GuestRun) -> None:
        with open(tmp_path_factory.getbasetemp() / "vm-boots.txt", "a") as f:
            f.write(f"{name}: {guest.seconds:.1f} s, status {guest.status}\n")
    return run

