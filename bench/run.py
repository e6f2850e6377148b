#!/usr/bin/env python3
"""minidisk against nbdkit and qemu-nbd on the same workloads, in the same run.

Starts the three servers side by side (each on its own unix socket under a fresh temporary
directory), prefills every device, then runs each workload on each server in turn, repeated
and interleaved so that noise on this shared VM spreads evenly over the servers; the median of
the repeats is reported.  Issue 4's device-mapper rows (linear and 4-way striped over memory
devices against the raw memory device; crypt, thin and snapshot against linear; first writes
to a new thin and to an origin with a new snapshot) are added when `minidisk serve` has
`--table`.

Next to each throughput it prints the CPU each server spent (/proc/PID/stat, all threads) per
4 KiB request or per MiB moved, so that a ratio set by the client rather than by the server
shows as such.  Prints Markdown tables with ratios and the issues' targets, and writes
everything, every sample included, to bench/results/<timestamp>.json.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
MINIDISK = REPO / ".venv" / "bin" / "minidisk"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

MiB = 1 << 20
GiB = 1 << 30
SECTOR = 512
DEVICE_SIZE = GiB
# 64 KiB chunks, LVM's default stripe size, so a 1 MiB request crosses every stripe.
STRIPE_CHUNK_SECTORS = 128
STRIPES = 4
THIN_BLOCK_SECTORS = 128  # 64 KiB, Docker's and LVM's default
# A first-write thin is this large (its pool's data device is DEVICE_SIZE): 4 KiB writes
# at random 64 KiB-aligned offsets in it almost never meet a block written before.
FIRST_WRITE_THIN_SIZE = 64 * GiB
FIRST_WRITE_SPAN = 512 * MiB  # what one first-write run may use of a device, at most
SNAPSHOT_CHUNK_SECTORS = 16  # 8 KiB, LVM's default


@dataclass(frozen=True)
class Metric:
    key: str
    unit: str
    higher_is_better: bool


IOPS = Metric("iops", "IOPS", True)
LATENCY = Metric("lat_us", "mean lat µs", False)
BANDWIDTH = Metric("mib_s", "MiB/s", True)
SECONDS = Metric("seconds", "s", False)
# Server CPU (utime + stime of all its threads) per request or per MiB: lower is better,
# shown beside the throughput, never judged against a target.
SERVER_CPU_REQ = Metric("server_us_per_req", "server CPU µs/req", False)
SERVER_CPU_MIB = Metric("server_us_per_mib", "server CPU µs/MiB", False)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """utime + stime of every thread of pid, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass(frozen=True)
class Settings:
    runtime_s: int
    repeat: int
    source_image: Path  # 1 GiB of random data in /dev/shm: nbdcopy's input and the prefill


@dataclass(frozen=True)
class FioJob:
    name: str
    rw: str
    block_size: str
    iodepth: int
    metrics: tuple[Metric, ...]
    # A first-write job moves a fixed amount instead of running for a time: every write
    # must land where the device has nothing of its own yet, which a timed run would use up.
    io_bytes: int | None = None

    def run(self, uri: str, settings: Settings, server_pid: int, size: int = DEVICE_SIZE,
            align: int | None = None) -> dict[str, float]:
        argv = ["fio", f"--name={self.name}", "--ioengine=nbd", f"--uri={uri}",
                f"--rw={self.rw}", f"--bs={self.block_size}", f"--iodepth={self.iodepth}",
                f"--size={size}", "--output-format=json"]
        if self.io_bytes is None:
            # The first second fills pipelines and warms caches; leave it out.
            argv += ["--time_based", f"--runtime={settings.runtime_s}", "--ramp_time=1"]
        else:
            argv += [f"--io_size={self.io_bytes}", "--norandommap"]
        if align is not None:
            argv.append(f"--blockalign={align}")
        cpu_before = process_cpu_s(server_pid)
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=settings.runtime_s + 120)
        cpu_s = process_cpu_s(server_pid) - cpu_before
        if done.returncode != 0:
            raise RuntimeError(f"fio {self.name} failed ({done.returncode}): {done.stderr.strip()}")
        job = parse_fio_json(done.stdout)["jobs"][0]
        if job.get("error"):
            raise RuntimeError(f"fio {self.name} reported error {job['error']}")
        side = job["read" if "read" in self.rw else "write"]
        # The CPU counter of a timed run covers the ramp second too; fio's counts leave it
        # out, so its steady rate is scaled to the run's wall time (as bench/userpath.py
        # does). A bounded run has no ramp: its own runtime is the wall time.
        elapsed_s = settings.runtime_s + 1 if self.io_bytes is None else side["runtime"] / 1000
        return {"iops": side["iops"], "lat_us": side["lat_ns"]["mean"] / 1000,
                "mib_s": side["bw_bytes"] / MiB, "ios": side["total_ios"],
                "server_us_per_req": cpu_s * 1e6 / max(side["iops"] * elapsed_s, 1),
                "server_us_per_mib": cpu_s * 1e6 / max(side["bw_bytes"] / MiB * elapsed_s, 1)}


@dataclass(frozen=True)
class CopyJob:
    name: str
    inbound: bool  # True: file -> export; False: export -> null:
    metrics: tuple[Metric, ...] = (SECONDS, SERVER_CPU_MIB)

    def run(self, uri: str, settings: Settings, server_pid: int) -> dict[str, float]:
        source, destination = (str(settings.source_image), uri) if self.inbound else (uri, "null:")
        cpu_before = process_cpu_s(server_pid)
        start = time.monotonic()
        nbdcopy(source, destination)
        seconds = time.monotonic() - start
        return {"seconds": seconds,
                "server_us_per_mib": (process_cpu_s(server_pid) - cpu_before) * 1e6
                / (DEVICE_SIZE / MiB)}


Workload = FioJob | CopyJob

FIO_JOBS: list[FioJob] = [
    FioJob("4k-randread-qd32", "randread", "4k", 32, (IOPS, LATENCY, SERVER_CPU_REQ)),
    FioJob("4k-randwrite-qd32", "randwrite", "4k", 32, (IOPS, LATENCY, SERVER_CPU_REQ)),
    FioJob("4k-randread-qd1", "randread", "4k", 1, (IOPS, LATENCY, SERVER_CPU_REQ)),
    FioJob("4k-randwrite-qd1", "randwrite", "4k", 1, (IOPS, LATENCY, SERVER_CPU_REQ)),
    FioJob("1m-read-qd8", "read", "1m", 8, (BANDWIDTH, SERVER_CPU_MIB)),
    FioJob("1m-write-qd8", "write", "1m", 8, (BANDWIDTH, SERVER_CPU_MIB)),
    FioJob("1m-read-qd1", "read", "1m", 1, (BANDWIDTH, SERVER_CPU_MIB)),
    FioJob("1m-write-qd1", "write", "1m", 1, (BANDWIDTH, SERVER_CPU_MIB)),
]
COPY_JOBS: list[CopyJob] = [CopyJob("nbdcopy-1g-in", True), CopyJob("nbdcopy-1g-out", False)]
# Issue 13's first writes: 8192 random 4 KiB writes, or 256 MiB written in order, each to a
# device made fresh for that one run (a new thin, a new snapshot of the origin).
FIRST_WRITE_JOBS: list[FioJob] = [
    FioJob("4k-randwrite-qd32-first", "randwrite", "4k", 32, (IOPS, SERVER_CPU_REQ),
           io_bytes=8192 * 4096),
    FioJob("1m-write-qd8-first", "write", "1m", 8, (BANDWIDTH, SERVER_CPU_MIB),
           io_bytes=256 * MiB),
]


def parse_fio_json(stdout: str) -> dict:
    """The JSON document in fio's output; the nbd engine prints lines before it."""
    decoder = json.JSONDecoder()
    start = stdout.find("{")
    while start != -1:
        try:
            document, _ = decoder.raw_decode(stdout, start)
        except json.JSONDecodeError:
            start = stdout.find("{", start + 1)
            continue
        if isinstance(document, dict) and "jobs" in document:
            return document
        start = stdout.find("{", start + 1)
    raise RuntimeError(f"no fio JSON in output: {stdout[:500]!r}")


def nbdcopy(source: str, destination: str) -> None:
    subprocess.run(["nbdcopy", source, destination], check=True, timeout=600)


def nbd_uri(socket: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={socket}"


@dataclass
class Server:
    """One NBD server process we started; only this pid is ever signalled."""
    name: str
    argv: list[str]
    socket: Path
    log: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self, probe_export: str, timeout_s: float = 60) -> None:
        with open(self.log, "wb") as log:
            # Own session: a Ctrl-C reaches only us, and the finally block stops the server.
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: "
                                   f"{self.log_tail()}")
            if self.socket.exists():
                probe = subprocess.run(["nbdinfo", "--size", nbd_uri(self.socket, probe_export)],
                                       capture_output=True, timeout=30)
                if probe.returncode == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer within {timeout_s} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # SIGTERM lets minidisk finish in-flight requests (and cProfile write its stats).
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])
        except OSError:
            return "(no log)"


@contextmanager
def running(server: Server, probe_export: str) -> Iterator[Server]:
    try:
        server.start(probe_export)
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class Minidisk:
    """How to start minidisk: from the working tree (the venv's editable install) or from a
    snapshot of a commit (PYTHONPATH wins over the editable path), optionally under cProfile."""
    snapshot_src: Path | None = None
    cprofile_out: Path | None = None
    serve_options: tuple[str, ...] = ()  # added to every `serve` (e.g. --busy-poll-us 100)

    def argv(self, *args: str) -> list[str]:
        if args[:1] == ("serve",) and "--help" not in args:
            args = ("serve", *self.serve_options, *args[1:])
        if self.snapshot_src is None and self.cprofile_out is None:
            return [str(MINIDISK), *args]
        if self.cprofile_out is None:
            call = "main()"
        else:
            # cProfile.run swallows click's SystemExit and dumps the stats once SIGTERM returns.
            call = f"import cProfile; cProfile.run('main()', {str(self.cprofile_out)!r})"
        code = ("import sys; sys.argv = ['minidisk', *sys.argv[1:]]; "
                f"from minidisk.cli.main import main; {call}")
        return [str(PYTHON), "-c", code, *args]

    def env(self) -> dict[str, str] | None:
        if self.snapshot_src is None:
            return None
        return {**os.environ, "PYTHONPATH": str(self.snapshot_src)}

    def profiled_as(self, suffix: str) -> Minidisk:
        out = self.cprofile_out
        return Minidisk(self.snapshot_src, out.with_name(out.name + suffix) if out else None,
                        self.serve_options)


def snapshot(revision: str, scratch: Path, name: str = "snapshot") -> Path:
    """src/ of `revision`, extracted under scratch; other engineers edit the shared tree."""
    target = scratch / name
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "src"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src"


@dataclass(frozen=True)
class Target:
    """One export measured as a column: a label, the server's socket, the export name and
    the server's pid (whose CPU is counted)."""
    label: str
    socket: Path
    export: str
    pid: int

    @property
    def uri(self) -> str:
        return nbd_uri(self.socket, self.export)


Samples = dict[str, dict[str, list[float]]]  # row -> column label -> one value per repeat


def row_name(workload: Workload, metric: Metric) -> str:
    return f"{workload.name} {metric.unit}"


def measure(workloads: list[Workload], targets: list[Target], settings: Settings,
            loads: list[float]) -> Samples:
    samples: Samples = {}
    for workload in workloads:
        for repeat in range(settings.repeat):
            # Interleave the columns within each repeat so a noisy minute hurts all of them.
            for target in targets:
                values = workload.run(target.uri, settings, target.pid)
                loads.append(os.getloadavg()[0])
                shown = ", ".join(f"{values[m.key]:.1f} {m.unit}"
                                  for m in workload.metrics)
                print(f"  {workload.name} #{repeat + 1} {target.label}: {shown}", flush=True)
                for metric in workload.metrics:
                    row = samples.setdefault(row_name(workload, metric), {})
                    row.setdefault(target.label, []).append(values[metric.key])
    return samples


def prefill(targets: list[Target], settings: Settings) -> None:
    # Read tests must read data, not holes a sparse backend answers without touching memory.
    for target in targets:
        print(f"  prefill {target.label}", flush=True)
        nbdcopy(str(settings.source_image), target.uri)


def run_core(workloads: list[Workload], settings: Settings, scratch: Path, shm: Path,
             server_names: list[str], minidisk: Minidisk, loads: list[float],
             baseline: Minidisk | None = None) -> Samples:
    qemu_image = shm / "qemu-nbd.img"
    with open(qemu_image, "wb") as f:
        f.truncate(DEVICE_SIZE)
    servers = {
        "minidisk": (Server("minidisk", minidisk.argv("serve", "-s", "--memory",
                                                      f"disk={DEVICE_SIZE}",
                                                      f"unix://{scratch / 'minidisk.sock'}"),
                            scratch / "minidisk.sock", scratch / "minidisk.log",
                            minidisk.env()), "disk"),
        # --baseline: an older commit of minidisk as one more column of the same run.
        "baseline": (Server("baseline", (baseline or minidisk).argv(
                                "serve", "-s", "--memory", f"disk={DEVICE_SIZE}",
                                f"unix://{scratch / 'baseline.sock'}"),
                            scratch / "baseline.sock", scratch / "baseline.log",
                            (baseline or minidisk).env()), "disk"),
        "nbdkit": (Server("nbdkit", ["nbdkit", "-f", "-U", str(scratch / "nbdkit.sock"),
                                     "memory", str(DEVICE_SIZE)],
                          scratch / "nbdkit.sock", scratch / "nbdkit.log"), ""),
        # Backed by a tmpfs file, not memory: page cache and a syscall per request.
        "qemu-nbd": (Server("qemu-nbd", ["qemu-nbd", "-f", "raw", "-t", "-e", "8",
                                         "--cache=unsafe", "--aio=threads",
                                         "-k", str(scratch / "qemu-nbd.sock"), str(qemu_image)],
                            scratch / "qemu-nbd.sock", scratch / "qemu-nbd.log"), ""),
    }
    with ExitStack() as stack:
        targets = []
        for name in server_names:
            server, export = servers[name]
            stack.enter_context(running(server, export))
            assert server.process is not None
            targets.append(Target(name, server.socket, export, server.process.pid))
        prefill(targets, settings)
        return measure(workloads, targets, settings, loads)


def dm_unavailable_reason(minidisk: Minidisk) -> str | None:
    done = subprocess.run(minidisk.argv("serve", "--help"), capture_output=True, text=True,
                          env=minidisk.env())
    if done.returncode != 0:
        return f"`minidisk serve --help` failed: {done.stderr.strip()}"
    if "--table" not in done.stdout:
        return "`minidisk serve --help` has no --table option yet"
    return None


def run_dm(workloads: list[FioJob], first_writes: list[FioJob], settings: Settings,
           scratch: Path, minidisk: Minidisk, loads: list[float]) -> tuple[Samples, Samples]:
    """Issue 4: raw memory vs linear over memory vs 4-way striped over memory, one server;
    issue 14: crypt (aes-xts-plain64, a fixed bench key) over memory, against linear;
    issue 13: a thin volume of a pool over memory, and a persistent snapshot of a memory
    origin (16-sector chunks), both against linear. The prefill provisions every block of
    the thin volume and gives the snapshot an exception for every chunk, so these rows
    measure provisioned thin I/O and I/O to a snapshot's own chunks. Then the first writes
    (`run_first_writes`): the second Samples."""
    sectors = DEVICE_SIZE // SECTOR
    stripe_sectors = sectors // STRIPES
    tables = {
        "lin": f"0 {sectors} linear /dev/linbase 0\n",
        "str": f"0 {sectors} striped {STRIPES} {STRIPE_CHUNK_SECTORS} "
               + " ".join(f"/dev/stripe{i} 0" for i in range(STRIPES)) + "\n",
        "cry": f"0 {sectors} crypt aes-xts-plain64 {bytes(range(64)).hex()} 0 /dev/cryptbase 0\n",
        "pool": f"0 {sectors} thin-pool /dev/thinmeta /dev/thindata {THIN_BLOCK_SECTORS} 0\n",
        "snap": f"0 {sectors} snapshot /dev/snaporigin /dev/snapcow P {SNAPSHOT_CHUNK_SECTORS}\n",
        # First writes: an origin whose snapshots come and go (and a pool, below).
        "cworig": f"0 {sectors} snapshot-origin /dev/cwbase\n",
    }
    serve_args = ["--memory", f"/dev/raw={DEVICE_SIZE}", "--memory", f"/dev/linbase={DEVICE_SIZE}",
                  "--memory", f"/dev/cryptbase={DEVICE_SIZE}",
                  "--memory", "/dev/thinmeta=64M", "--memory", f"/dev/thindata={DEVICE_SIZE}",
                  "--memory", f"/dev/snaporigin={DEVICE_SIZE}",
                  # every chunk an exception, with room for the areas that index them
                  "--memory", f"/dev/snapcow={DEVICE_SIZE + DEVICE_SIZE // 16}",
                  "--memory", f"/dev/cwbase={DEVICE_SIZE}"]
    # Each first-write run has fresh memory of its own: a COW device, a memory device for
    # linear-fresh, and room in the pool's data device that no thin used before (the pool
    # allocates onwards from its last allocation). A memory device holds only what is
    # written, and fresh RAM is what a first write costs there (see run_first_writes).
    runs = len(first_writes) * settings.repeat
    fresh = [(f"/dev/cow{i}", f"/dev/lfresh{i}") for i in range(runs)]
    for cow, memory in fresh:
        serve_args += ["--memory", f"{cow}={FIRST_WRITE_SPAN * 9 // 8}",
                       "--memory", f"{memory}={DEVICE_SIZE}"]
    fwdata = max(runs, 1) * FIRST_WRITE_SPAN
    serve_args += ["--memory", "/dev/fwmeta=64M", "--memory", f"/dev/fwdata={fwdata}"]
    tables["fwpool"] = (f"0 {fwdata // SECTOR} thin-pool /dev/fwmeta /dev/fwdata "
                        f"{THIN_BLOCK_SECTORS} 0\n")
    serve_args += [arg for i in range(STRIPES)
                   for arg in ("--memory", f"/dev/stripe{i}={stripe_sectors * SECTOR}")]
    for name, text in tables.items():
        table_file = scratch / f"{name}.table"
        table_file.write_text(text)
        serve_args += ["--table", f"{name}={table_file}"]
    socket = scratch / "dm.sock"
    server = Server("minidisk-dm",
                    minidisk.argv("serve", "-s", *serve_args, f"unix://{socket}"),
                    socket, scratch / "dm.log", minidisk.env())
    with running(server, "dev/mapper/str"):
        assert server.process is not None
        pid = server.process.pid
        dmsetup = DmSetup(Minidisk(minidisk.snapshot_src).argv("dmsetup", "--server",
                                                               f"unix://{socket}"),
                          minidisk.env())
        dmsetup("message", "pool", "0", "create_thin 0")
        dmsetup("create", "thin", "--table", f"0 {sectors} thin /dev/mapper/pool 0")
        targets = [Target("raw", socket, "dev/raw", pid),
                   Target("linear", socket, "dev/mapper/lin", pid),
                   Target("striped", socket, "dev/mapper/str", pid),
                   Target("crypt", socket, "dev/mapper/cry", pid),
                   Target("thin", socket, "dev/mapper/thin", pid),
                   Target("snapshot", socket, "dev/mapper/snap", pid)]
        prefill([*targets, Target("origin", socket, "dev/mapper/cworig", pid)], settings)
        samples = measure(list(workloads), targets, settings, loads)
        first = run_first_writes(first_writes, settings, dmsetup, targets[1], fresh, loads)
        return samples, first


@dataclass(frozen=True)
class DmSetup:
    """`minidisk dmsetup` against the bench's dm server."""
    argv: list[str]
    env: dict[str, str] | None

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.argv, *args], check=True, env=self.env,
                              capture_output=True, text=True, timeout=120).stdout


def run_first_writes(jobs: list[FioJob], settings: Settings, dmsetup: DmSetup,
                     linear: Target, fresh: list[tuple[str, str]],
                     loads: list[float]) -> Samples:
    """Issue 13's first writes, each run on a device made for it: a new thin of `fwpool`
    (FIRST_WRITE_THIN_SIZE, 4 KiB writes at 64 KiB-aligned offsets: each provisions a
    block and zeroes the rest of it), and the origin `cworig` with a new persistent
    snapshot on a fresh COW device (8 KiB-aligned: each write copies a chunk out first).
    The baselines run the same job: `linear` over memory written before (the issue's
    "linear over the same memory device"), and `linear-fresh`, a new linear over a memory
    device nothing wrote yet. A first write to a memory device costs fresh RAM, and page
    faults are dear on this VM (a 32 KiB page ~110 µs where a reused one costs ~15), so
    linear-fresh shows what of the thin's cost is the memory device's, not the target's.
    Random offsets may meet a block or chunk written before in the same run: each run
    counts the blocks and chunks it made, and the share of first writes is reported."""
    samples: Samples = {}
    chunk = SNAPSHOT_CHUNK_SECTORS * SECTOR
    thin_block = THIN_BLOCK_SECTORS * SECTOR
    runs = 0

    def record(job: FioJob, label: str, values: dict[str, float], first: float | None) -> None:
        loads.append(os.getloadavg()[0])
        shown = ", ".join(f"{values[m.key]:.1f} {m.unit}" for m in job.metrics)
        share = f", {first:.1%} first writes" if first is not None else ""
        print(f"  {job.name} {label}: {shown}{share}", flush=True)
        for metric in job.metrics:
            samples.setdefault(row_name(job, metric), {}).setdefault(label, []).append(
                values[metric.key])
        if first is not None:
            samples.setdefault(f"{job.name} first-write share %", {}).setdefault(
                label, []).append(first * 100)

    def uri(name: str) -> str:
        return nbd_uri(linear.socket, f"dev/mapper/{name}")

    for job in jobs:
        for _ in range(settings.repeat):
            cow, memory = fresh[runs]
            random_offsets = job.rw.startswith("rand")
            record(job, "linear", job.run(linear.uri, settings, linear.pid, DEVICE_SIZE,
                                          thin_block), None)

            name = f"lf{runs}"
            dmsetup("create", name, "--table", f"0 {DEVICE_SIZE // SECTOR} linear {memory} 0")
            record(job, "linear-fresh", job.run(uri(name), settings, linear.pid, DEVICE_SIZE,
                                                thin_block), None)
            dmsetup("remove", name)

            thin_id = 100 + runs
            name = f"fw{thin_id}"
            dmsetup("message", "fwpool", "0", f"create_thin {thin_id}")
            dmsetup("create", name, "--table",
                    f"0 {FIRST_WRITE_THIN_SIZE // SECTOR} thin /dev/mapper/fwpool {thin_id}")
            values = job.run(uri(name), settings, linear.pid, FIRST_WRITE_THIN_SIZE, thin_block)
            mapped_sectors = int(dmsetup("status", name).split()[3])
            record(job, "thin", values, mapped_sectors / THIN_BLOCK_SECTORS / values["ios"]
                   if random_offsets else None)
            dmsetup("remove", name)
            dmsetup("message", "fwpool", "0", f"delete {thin_id}")

            snap = f"cws{runs}"
            dmsetup("suspend", "cworig")
            dmsetup("create", snap, "--table", f"0 {DEVICE_SIZE // SECTOR} snapshot "
                    f"/dev/cwbase {cow} P {SNAPSHOT_CHUNK_SECTORS}")
            dmsetup("resume", "cworig")
            values = job.run(uri("cworig"), settings, linear.pid, DEVICE_SIZE, chunk)
            # <allocated>/<total> <metadata>, in sectors
            allocated, metadata = dmsetup("status", snap).split()[3:5]
            chunks = (int(allocated.split("/")[0]) - int(metadata)) // SNAPSHOT_CHUNK_SECTORS
            record(job, "origin", values, chunks / values["ios"] if random_offsets else None)
            dmsetup("remove", snap)
            runs += 1
    return samples


def median_table(samples: Samples, columns: list[str],
                 ratios: list[tuple[str, str]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    medians = {row: {c: statistics.median(v) for c, v in by_column.items()}
               for row, by_column in samples.items()}
    header = ["workload", *columns, *(f"{a}/{b}" for a, b in ratios)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, by_column in medians.items():
        cells = [row, *(f"{by_column[c]:,.1f}" if c in by_column else "—" for c in columns)]
        for a, b in ratios:
            cells.append(f"{by_column[a] / by_column[b]:.2f}×"
                         if a in by_column and by_column.get(b) else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines, medians


@dataclass(frozen=True)
class Goal:
    """An issue's target: medians[row][subject] / medians[row][baseline] against a bound."""
    text: str
    rows: tuple[str, ...]
    subject: str
    baseline: str
    bound: float
    at_most: bool  # True for latencies and times: the ratio must not exceed the bound

    def check(self, medians: dict[str, dict[str, float]]) -> list[tuple[str, str]]:
        verdicts = []
        for row in self.rows:
            values = medians.get(row, {})
            if self.subject not in values or self.baseline not in values:
                continue
            ratio = values[self.subject] / values[self.baseline]
            met = ratio <= self.bound if self.at_most else ratio >= self.bound
            verdicts.append((f"{self.text} — {row}: {ratio:.2f}×", "met" if met else "NOT MET"))
        return verdicts


CORE_GOALS = [
    Goal("1 MiB sequential ≥ 0.8× nbdkit", ("1m-read-qd8 MiB/s", "1m-write-qd8 MiB/s"),
         "minidisk", "nbdkit", 0.8, False),
    Goal("issue 19: 1 MiB sequential ≥ 1.0× nbdkit",
         ("1m-read-qd8 MiB/s", "1m-write-qd8 MiB/s", "1m-read-qd1 MiB/s", "1m-write-qd1 MiB/s"),
         "minidisk", "nbdkit", 1.0, False),
    Goal("issue 19: depth-1 latency ≤ 1.0× nbdkit",
         ("4k-randread-qd1 mean lat µs", "4k-randwrite-qd1 mean lat µs"),
         "minidisk", "nbdkit", 1.0, True),
    Goal("4 KiB depth 32 ≥ 0.5× nbdkit", ("4k-randread-qd32 IOPS", "4k-randwrite-qd32 IOPS"),
         "minidisk", "nbdkit", 0.5, False),
    Goal("depth-1 latency ≤ 3× nbdkit",
         ("4k-randread-qd1 mean lat µs", "4k-randwrite-qd1 mean lat µs"),
         "minidisk", "nbdkit", 3.0, True),
]
# Device-mapper goals are about throughput, so they are judged on the IOPS and MiB/s rows.
DM_ROWS = tuple(row_name(job, m) for job in FIO_JOBS for m in job.metrics if m.higher_is_better)
DM_GOALS = [Goal("linear ≥ 0.9× raw", DM_ROWS, "linear", "raw", 0.9, False),
            Goal("4-way striped ≥ 0.85× raw", DM_ROWS, "striped", "raw", 0.85, False),
            Goal("issue 14: crypt aes-xts ≥ 0.5× linear", DM_ROWS, "crypt", "linear", 0.5,
                 False),
            Goal("issue 13: thin, provisioned, ≥ 0.8× linear", DM_ROWS, "thin", "linear", 0.8,
                 False),
            Goal("issue 13: snapshot reads ≥ 0.8× linear",
                 tuple(row for row in DM_ROWS if "read" in row), "snapshot", "linear", 0.8,
                 False)]

FIRST_WRITE_ROWS = tuple(row_name(job, m) for job in FIRST_WRITE_JOBS for m in job.metrics
                         if m.higher_is_better)
FIRST_WRITE_GOALS = [Goal("issue 13: thin first writes ≥ 0.3× linear", FIRST_WRITE_ROWS,
                          "thin", "linear", 0.3, False),
                     Goal("issue 13: thin first writes ≥ 0.3× linear over fresh memory",
                          FIRST_WRITE_ROWS, "thin", "linear-fresh", 0.3, False)]


def make_source_image(path: Path) -> None:
    # Random bytes so that no server can shortcut zeroes; 64 MiB of urandom repeated is enough.
    block = os.urandom(64 * MiB)
    with open(path, "wb") as f:
        for _ in range(DEVICE_SIZE // len(block)):
            f.write(block)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def begin(title: str, runtime_s: int, repeat: int) -> tuple[str, dict]:
    """A run's start time and the report's opening fields, with its header and the load it
    starts under printed (userpath.py starts the same way)."""
    started = time.strftime("%Y%m%d-%H%M%S")
    report: dict = {"started": started, "argv": sys.argv[1:], "runtime_s": runtime_s,
                    "repeat": repeat, "nproc": os.cpu_count(), "uptime_start": uptime()}
    print(f"# {title} {started}: {runtime_s} s runs, median of {repeat}, "
          f"{os.cpu_count()} CPUs", flush=True)
    print(f"load at start: {report['uptime_start']}", flush=True)
    return started, report


@contextmanager
def scratch_directories(prefix: str) -> Iterator[tuple[Path, Path]]:
    """(a directory in /tmp, one in /dev/shm) for a run's files, removed afterwards with
    whatever is mounted below them left alone."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        shm = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm"))
        try:
            yield scratch, shm
        finally:
            subprocess.run(["rm", "-rf", "--one-file-system", str(shm)], check=False)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(scratch)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s runs instead of 10 s")
    parser.add_argument("--only", metavar="NAME", action="append",
                        help="only workloads whose name contains NAME (repeatable); "
                             "'dm' selects the device-mapper section, 'core' the servers' one")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--runtime", type=int, help="seconds per fio run (overrides --quick)")
    parser.add_argument("--servers", default="minidisk,nbdkit,qemu-nbd",
                        help="comma-separated subset of minidisk,nbdkit,qemu-nbd")
    parser.add_argument("--cprofile", metavar="FILE", type=Path,
                        help="run minidisk under cProfile and write its stats to FILE "
                             "(the dm server's to FILE.dm)")
    parser.add_argument("--busy-poll-us", type=int, default=0, metavar="US",
                        help="start the minidisk servers with --busy-poll-us US (default: "
                             "off, as `minidisk serve` is)")
    parser.add_argument("--snapshot", metavar="REV",
                        help="run minidisk from `git archive REV src` instead of the working "
                             "tree, which other engineers may be editing")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run minidisk from `git archive REV src` as the column "
                             "'baseline' of the same run (a same-run A/B of two commits)")
    args = parser.parse_args()

    settings_runtime = args.runtime or (3 if args.quick else 10)
    only: list[str] = args.only or []
    server_names = [s for s in args.servers.split(",") if s]
    if "baseline" in server_names:  # a column --baseline adds by itself, not a server name
        parser.error("--servers: 'baseline' is the column of --baseline REV; leave it out")
    if args.baseline:
        server_names.insert(server_names.index("minidisk") + 1 if "minidisk" in server_names
                            else 0, "baseline")

    # --only words are section names ("core", "dm") or parts of workload names.
    sections = {"core", "dm"} & set(only) or ({"core"} if only else {"core", "dm"})
    name_words = [word for word in only if word not in ("core", "dm")]

    def selected(workload: Workload) -> bool:
        return not name_words or any(word in workload.name for word in name_words)

    core_workloads: list[Workload] = [w for w in [*COPY_JOBS, *FIO_JOBS]
                                      if "core" in sections and selected(w)]
    dm_workloads = [w for w in FIO_JOBS if "dm" in sections and selected(w)]
    first_writes = [w for w in FIRST_WRITE_JOBS if "dm" in sections and selected(w)]

    started, report = begin("minidisk bench", settings_runtime, args.repeat)
    loads: list[float] = []
    output: list[str] = []
    verdicts: list[tuple[str, str]] = []
    with scratch_directories("minidisk-bench-") as (scratch, shm):
        settings = Settings(settings_runtime, args.repeat, shm / "source.img")
        make_source_image(settings.source_image)
        minidisk = Minidisk(snapshot(args.snapshot, scratch) if args.snapshot else None,
                            args.cprofile.resolve() if args.cprofile else None,
                            ("--busy-poll-us", str(args.busy_poll_us))
                            if args.busy_poll_us else ())
        if args.busy_poll_us:
            report["busy_poll_us"] = args.busy_poll_us
            print(f"minidisk servers busy-poll {args.busy_poll_us} µs", flush=True)
        if args.snapshot:
            report["snapshot"] = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", args.snapshot],
                capture_output=True, text=True).stdout.strip()
        if core_workloads:
            print("## servers", flush=True)
            baseline = (Minidisk(snapshot(args.baseline, scratch, "baseline"), None,
                                 minidisk.serve_options) if args.baseline else None)
            if args.baseline:
                report["baseline"] = subprocess.run(
                    ["git", "-C", str(REPO), "rev-parse", args.baseline],
                    capture_output=True, text=True).stdout.strip()
            samples = run_core(core_workloads, settings, scratch, shm, server_names,
                               minidisk, loads, baseline)
            ratios = [("minidisk", other) for other in ("baseline", "nbdkit", "qemu-nbd")
                      if "minidisk" in server_names and other in server_names]
            lines, medians = median_table(samples, server_names, ratios)
            output += ["", "## minidisk vs nbdkit vs qemu-nbd "
                       "(medians; lat and s: lower is better)", "", *lines]
            report["core"] = {"samples": samples, "medians": medians}
            for goal in CORE_GOALS:
                verdicts += goal.check(medians)
        if dm_workloads or first_writes:
            reason = dm_unavailable_reason(minidisk)
            if reason:
                output += ["", f"dm not available: {reason}"]
                report["dm"] = {"unavailable": reason}
            else:
                print("## device-mapper", flush=True)
                try:
                    samples, first = run_dm(dm_workloads, first_writes, settings, scratch,
                                            minidisk.profiled_as(".dm"), loads)
                except (RuntimeError, subprocess.SubprocessError) as e:
                    output += ["", f"dm not available: {e}"]
                    report["dm"] = {"unavailable": str(e)}
                else:
                    columns = ["raw", "linear", "striped", "crypt", "thin", "snapshot"]
                    lines, medians = median_table(samples, columns,
                                                  [("linear", "raw"), ("striped", "raw"),
                                                   ("crypt", "linear"), ("thin", "linear"),
                                                   ("snapshot", "linear")])
                    output += ["", "## device-mapper over memory devices (medians, one server)",
                               "", *lines]
                    report["dm"] = {"samples": samples, "medians": medians,
                                    "stripe_chunk_sectors": STRIPE_CHUNK_SECTORS}
                    for goal in DM_GOALS:
                        verdicts += goal.check(medians)
                    if first:
                        lines, medians = median_table(
                            first, ["linear", "linear-fresh", "thin", "origin"],
                            [("thin", "linear"), ("thin", "linear-fresh"),
                             ("origin", "linear"), ("origin", "linear-fresh")])
                        output += ["", "## first writes: a new thin, and origin writes that copy "
                                   "out to a new snapshot (medians, same server)", "", *lines]
                        report["dm"]["first_writes"] = {"samples": first, "medians": medians}
                        for goal in FIRST_WRITE_GOALS:
                            verdicts += goal.check(medians)

    finish(report, output, loads, verdicts, f"{started}.json")
    return 0


def finish(report: dict, output: list[str], loads: list[float],
           verdicts: list[tuple[str, str]], name: str) -> None:
    """Print the tables with the targets and the load they were measured under, and keep the
    whole report as bench/results/NAME (userpath.py ends the same way)."""
    report["uptime_end"] = uptime()
    report["load_1min_per_sample"] = loads
    report["targets"] = [{"target": text, "verdict": verdict} for text, verdict in verdicts]
    output += ["", "## targets", "", *(f"- [{verdict}] {text}" for text, verdict in verdicts)]
    if loads:
        output += ["", f"1-min load during the samples: min {min(loads):.2f}, "
                       f"median {statistics.median(loads):.2f}, max {max(loads):.2f} "
                       f"on {os.cpu_count()} CPUs"]
    output += [f"load at end: {report['uptime_end']}"]
    print("\n".join(output))

    RESULTS_DIR.mkdir(exist_ok=True)
    result_file = RESULTS_DIR / name
    result_file.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nresults: {result_file.relative_to(REPO)}")


if __name__ == "__main__":
    sys.exit(main())
