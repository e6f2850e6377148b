"""Run a bash script in a fresh guest running Debian 12's kernel, and collect what it left.

This machine's kernel has no nbd, dm or ocfs2 modules; scripts/bootstrap.sh unpacks Debian's
`linux-image-6.1.0-N-amd64` into .cache/kernel (never installing it) and links its modules
under /lib/modules. virtme-ng boots that kernel under qemu with the host's root shared
read-only (9p) and throwaway overlays on /tmp, /etc, /var…, so the guest runs the checkout's
own virtualenv and the host's tools. One host directory (`--rwdir`) is writable: the script's
status, output and result files land there. virtme's script output ports need udev, which
the guest lacks, so nothing is read from the console but diagnostics.

KVM: /dev/kvm opens on these machines but a real guest makes no progress (no nested
virtualization; qemu's `-cpu host` also fails on MSR 0x10a), so `kvm_problem()` boots the
kernel under KVM for a few seconds first and falls back to TCG (`--disable-kvm`) when it does
not print its banner. TCG is ~10× slower at the kernel and ~60× at Python: batch checks into
few boots.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.harness import MINIDISK, ROOT, VENV_BIN

KERNEL_CACHE = ROOT / ".cache" / "kernel"
GUEST_SCRIPTS = Path(__file__).resolve().parent / "guest"
KVM_PROBE_SECONDS = 8.0  # a working KVM prints the kernel banner in well under a second
BANNER = b"Linux version "


# What 6.1 logs when it oopses or finds its own memory corrupted: once it has, the guest's
# answers are the broken kernel's, not 6.1's.
KERNEL_CRASH = re.compile(r"^.*(?:BUG:|Oops:|kernel BUG at|list_del corruption|"
                          r"general protection fault|Kernel panic).*$", re.M)


def kernel_crash(dmesg: str) -> str:
    """The first lines of the kernel's own report of a crash in `dmesg`, or ''."""
    match = KERNEL_CRASH.search(dmesg)
    if match is None:
        return ""
    return "\n".join(dmesg[match.start():].splitlines()[:30]) + "\n"


class HarnessError(Exception):
    """The harness cannot boot a guest here: a missing set-up step, named in the message."""


@dataclass(frozen=True)
class Kernel:
    version: str  # 6.1.0-57-amd64
    image: Path  # .cache/kernel/VERSION/boot/vmlinuz-VERSION


@dataclass(frozen=True)
class GuestRun:
    status: int | None  # the script's exit status; None when it never finished
    output: str  # the script's stdout and stderr
    console: str  # qemu's serial console: the kernel log and virtme's messages
    results: Path  # the shared directory, with the files the script wrote
    seconds: float  # from starting vng to the guest powering off

    def text(self, name: str) -> str:
        return (self.results / name).read_text()

    def explain(self) -> str:
        """What a failing test shows: the status, the script's output, the console's tail."""
        console = "\n".join(self.console.splitlines()[-40:])
        return (f"guest script status {self.status} after {self.seconds:.1f} s\n"
                f"--- output ---\n{self.output}\n--- console (tail) ---\n{console}")


def find_kernel() -> Kernel:
    images = sorted(KERNEL_CACHE.glob("*/boot/vmlinuz-*"))
    if len(images) != 1:
        raise HarnessError(f"expected one kernel in {KERNEL_CACHE}, found {len(images)}: "
                           "run scripts/bootstrap.sh")
    version = images[0].name.removeprefix("vmlinuz-")
    if not Path(f"/lib/modules/{version}/modules.dep").exists():
        raise HarnessError(f"/lib/modules/{version} does not lead to the unpacked modules: "
                           "run scripts/bootstrap.sh")
    return Kernel(version, images[0])


def vng() -> str:
    path = VENV_BIN / "vng"
    if not path.exists():
        raise HarnessError(f"{path} is missing: run scripts/bootstrap.sh (virtme-ng)")
    return str(path)


def kvm_problem(kernel: Kernel, workdir: Path) -> str | None:
    """None when KVM runs this kernel, else why not (then the harness uses TCG).

    Boots the kernel as vng would (`-cpu host`) and waits for its banner on the serial port;
    a vCPU stuck in KVM_RUN would hang any finer probe, so qemu is killed after a timeout.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no usable /dev/kvm"
    serial = workdir / "kvm-probe.serial"
    argv = ["qemu-system-x86_64", "-machine", "accel=kvm", "-cpu", "host", "-m", "256M",
            "-display", "none", "-no-reboot", "-net", "none", "-serial", f"file:{serial}",
            "-kernel", str(kernel.image), "-append", "console=ttyS0 earlyprintk=serial panic=-1"]
    try:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise HarnessError("qemu-system-x86_64 is missing: run scripts/bootstrap.sh") from None
    deadline = time.monotonic() + KVM_PROBE_SECONDS
    try:
        while time.monotonic() < deadline and qemu.poll() is None:
            if serial.exists() and BANNER in serial.read_bytes():
                return None
            time.sleep(0.1)
    finally:
        qemu.kill()
        _, stderr = qemu.communicate()
    if serial.exists() and BANNER in serial.read_bytes():
        return None
    if qemu.returncode not in (None, -signal.SIGKILL):
        last = stderr.strip().splitlines()[-1:] or ["no message"]
        return f"qemu under KVM exited {qemu.returncode}: {last[0]}"
    return (f"a KVM guest printed nothing in {KVM_PROBE_SECONDS:g} s "
            "(KVM_RUN makes no progress without nested virtualization)")


def _wait_for_guest(guest: subprocess.Popen[bytes], console: Path, deadline: float,
                    crash_grace: float) -> None:
    """Until the guest powers off, the deadline passes, or `crash_grace` seconds after its
    kernel reported a crash (6.1 here sometimes finds its own memory corrupt and then
    hangs: waiting out the whole timeout for it cost a CI run 15 minutes)."""
    crashed_at: float | None = None
    while True:
        now = time.monotonic()
        try:
            guest.wait(min(1.0, max(deadline - now, 0.01)))
            return
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if crashed_at is None and kernel_crash(console.read_text(errors="replace")):
            crashed_at = now
        if now >= deadline or (crashed_at is not None and now - crashed_at >= crash_grace):
            os.killpg(guest.pid, signal.SIGKILL)
            guest.wait()
            return


def run_in_guest(script: str, results: Path, *, kernel: Kernel, kvm: bool,
                 timeout: float = 300.0, cpus: int = 2, memory: str = "2G",
                 vng_args: Sequence[str] = (), crash_grace: float = 60.0) -> GuestRun:
    """Boot a fresh guest, run `script` with bash as root in it, and power it off.

    The script runs in `results` (shared with the host, writable) with $RESULTS naming it and
    $MINIDISK, $PYTHON the checkout's virtualenv. It has `timeout` seconds, boot included, and
    `crash_grace` seconds to finish after its kernel reports a crash (`kernel_crash`).
    """
    results.mkdir(parents=True, exist_ok=True)
    (results / "script.sh").write_text(script)
    # The wrapper records what virtme cannot pass back without udev: status and output.
    (results / "run.sh").write_text(
        f"export RESULTS={results} MINIDISK={MINIDISK} "
        f"PYTHON={VENV_BIN / 'python'} PATH={VENV_BIN}:$PATH\n"
        f"cd {results}\n"
        f"bash {results / 'script.sh'} > {results / 'output'} 2>&1\n"
        f"echo $? > {results / 'status'}\n")
    console = results.parent / f"{results.name}.console"
    argv = [vng(), "--run", str(kernel.image), "--user", "root", "--cpus", str(cpus),
            "--memory", memory, "--rwdir", str(results), "--force-9p", "--verbose",
            *([] if kvm else ["--disable-kvm"]),
            # Under TCG on a loaded host the kernel's IO-APIC timer check can fail and panic
            # ("IO-APIC + timer doesn't work", seen here): the check proves nothing in a VM.
            "--append", "no_timer_check", *vng_args,
            "--", "bash", str(results / "run.sh")]
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    started = time.monotonic()
    with open(console, "wb") as log:
        # vng → virtme-run → qemu: a session of their own, so a timeout can end all three.
        guest = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                 start_new_session=True)
        _wait_for_guest(guest, console, started + timeout, crash_grace)
    seconds = time.monotonic() - started
    status_file, output_file = results / "status", results / "output"
    status = int(status_file.read_text()) if status_file.exists() else None
    output = output_file.read_text(errors="replace") if output_file.exists() else ""
    return GuestRun(status, output, console.read_text(errors="replace"), results, seconds)


Boot = Callable[..., "GuestRun"]  # the `boot(name, script)` fixture of conftest.py


class Rows:
    """The rows a guest script left in $RESULTS/rows (guest/lib.sh), read by name."""

    def __init__(self, run: GuestRun) -> None:
        self.run = run

    def __getitem__(self, name: str) -> str:
        path = self.run.results / "rows" / name
        if not path.exists():
            pytest.fail(f"the guest left no row {name!r}\n{self.run.explain()}")
        return path.read_text().strip()

    def status(self, name: str) -> int:
        return int(self[f"{name}.rc"])

    def error(self, name: str) -> str:
        return self[f"{name}.err"]


def guest_script(name: str, *args: str) -> str:
    """The bash command line that runs tests/vm/guest/NAME with ARGS."""
    return " ".join(["bash", str(GUEST_SCRIPTS / name), *args]) + "\n"
