#!/usr/bin/env python3
"""The user's path: fio on the attached block device, minidisk against nbdkit, same run.

Issue 20's "Speed" (and issue 19's item 4): a user does not run fio's nbd engine, they attach
the export and use /dev/loopN.  This machine's kernel has no nbd module, so the path is the
one `minidisk attach` takes here: nbdfuse (libnbd, multithreaded FUSE, -C 4 when the server
allows multi-conn) exposes the export as a file, and a loop device with direct I/O on makes it
a block device.  Both servers go through exactly that path: `minidisk attach --method nbdfuse`
for each export, `minidisk detach` at the end.

fio runs with ioengine=libaio and direct=1 on the loop device.  Next to each throughput the
script prints the CPU the server and nbdfuse spent during the run (from /proc/PID/stat), as
µs per request (4 KiB rows) or per MiB (1 MiB rows), so that a ratio set by nbdfuse or the
loop driver rather than by the server shows as such.  With --protocol the same jobs also run
with fio's nbd engine straight to each server (columns "minidisk nbd", "nbdkit nbd"), in the
same repeats, so the path's cost and the protocol-level ratio of the moment sit side by side.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402  (bench/ is a directory of scripts, not a package)
    BANDWIDTH,
    DEVICE_SIZE,
    IOPS,
    Goal,
    Metric,
    MiB,
    Minidisk,
    Server,
    begin,
    finish,
    make_source_image,
    median_table,
    nbd_uri,
    nbdcopy,
    parse_fio_json,
    process_cpu_s,
    running,
    scratch_directories,
    snapshot,
)

# CPU cost rows: lower is better, never judged against a target.
SERVER_CPU_REQ = Metric("server_us_per_req", "server CPU µs/req", False)
FUSE_CPU_REQ = Metric("fuse_us_per_req", "nbdfuse CPU µs/req", False)
SERVER_CPU_MIB = Metric("server_us_per_mib", "server CPU µs/MiB", False)
FUSE_CPU_MIB = Metric("fuse_us_per_mib", "nbdfuse CPU µs/MiB", False)
MACHINE_BUSY = Metric("machine_busy", "machine busy %", False)


@dataclass(frozen=True)
class Settings:
    runtime_s: int
    repeat: int


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass(frozen=True)
class Attached:
    """One export attached through nbdfuse + loop: the column of the table."""
    label: str
    device: str
    server_pid: int
    fuse_pid: int | None  # None: fio's nbd engine straight to the server (--protocol)
    uri: str


@dataclass(frozen=True)
class FioJob:
    name: str
    rw: str
    block_size: str
    iodepth: int

    @property
    def small(self) -> bool:
        return self.block_size == "4k"

    @property
    def metrics(self) -> tuple[Metric, ...]:
        if self.small:
            return IOPS, SERVER_CPU_REQ, FUSE_CPU_REQ, MACHINE_BUSY
        return BANDWIDTH, SERVER_CPU_MIB, FUSE_CPU_MIB, MACHINE_BUSY

    def run(self, target: Attached, settings: Settings) -> dict[str, float]:
        if target.fuse_pid is None:
            where = ["--ioengine=nbd", f"--uri={target.uri}", f"--size={DEVICE_SIZE}"]
        else:
            where = [f"--filename={target.device}", "--ioengine=libaio", "--direct=1"]
        argv = ["fio", f"--name={self.name}", *where, f"--rw={self.rw}",
                f"--bs={self.block_size}", f"--iodepth={self.iodepth}",
                "--time_based", f"--runtime={settings.runtime_s}",
                # The first second fills pipelines and warms caches; leave it out.
                "--ramp_time=1", "--output-format=json"]
        server_before = process_cpu_s(target.server_pid)
        fuse_before = process_cpu_s(target.fuse_pid) if target.fuse_pid else 0.0
        busy_before, total_before = machine_ticks()
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=settings.runtime_s + 120)
        server_cpu = process_cpu_s(target.server_pid) - server_before
        fuse_cpu = process_cpu_s(target.fuse_pid) - fuse_before if target.fuse_pid else 0.0
        busy_after, total_after = machine_ticks()
        if done.returncode != 0:
            raise RuntimeError(f"fio {self.name} on {target.device} failed "
                               f"({done.returncode}): {done.stderr.strip()}")
        job = parse_fio_json(done.stdout)["jobs"][0]
        if job.get("error"):
            raise RuntimeError(f"fio {self.name} reported error {job['error']}")
        side = job["read" if "read" in self.rw else "write"]
        # The CPU counters cover the whole fio run, ramp included; fio's counts leave the ramp
        # out, so scale its steady rate to the run's wall time (the ramp runs at that rate too,
        # after its first milliseconds).
        elapsed_s = settings.runtime_s + 1
        requests = side["iops"] * elapsed_s
        mib = side["bw_bytes"] / MiB * elapsed_s
        values = {"iops": side["iops"], "mib_s": side["bw_bytes"] / MiB,
                  "machine_busy": 100 * (busy_after - busy_before)
                  / max(1, total_after - total_before)}
        if self.small:
            values["server_us_per_req"] = server_cpu * 1e6 / max(requests, 1)
            if target.fuse_pid:
                values["fuse_us_per_req"] = fuse_cpu * 1e6 / max(requests, 1)
        else:
            values["server_us_per_mib"] = server_cpu * 1e6 / max(mib, 1)
            if target.fuse_pid:
                values["fuse_us_per_mib"] = fuse_cpu * 1e6 / max(mib, 1)
        return values


FIO_JOBS = [
    FioJob("4k-randread-qd32", "randread", "4k", 32),
    FioJob("4k-randwrite-qd32", "randwrite", "4k", 32),
    FioJob("1m-read-qd8", "read", "1m", 8),
    FioJob("1m-write-qd8", "write", "1m", 8),
]

GOALS = [
    Goal("user path ≥ 1.0× nbdkit",
         ("4k-randread-qd32 IOPS", "4k-randwrite-qd32 IOPS", "1m-read-qd8 MiB/s",
          "1m-write-qd8 MiB/s"), "minidisk", "nbdkit", 1.0, False),
]


@contextmanager
def attached(label: str, uri: str, server: Server, tool: Minidisk,
             env: dict[str, str]) -> Iterator[Attached]:
    """`minidisk attach --method nbdfuse URI` for this run only, detached in any case."""
    done = subprocess.run(tool.argv("attach", "--method", "nbdfuse", uri), capture_output=True,
                          text=True, env=env, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"attach {uri} failed ({done.returncode}): {done.stderr.strip()}")
    device = done.stdout.strip().splitlines()[-1]
    try:
        record = json.loads((Path(env["MINIDISK_STATE_DIR"]) / "attach"
                             / f"{Path(device).name}.json").read_text())
        fuse_pid = next(h["pid"] for h in record["helpers"] if h["name"] == "nbdfuse")
        assert server.process is not None
        print(f"  {label}: {uri} on {device} (nbdfuse pid {fuse_pid})", flush=True)
        yield Attached(label, device, server.process.pid, fuse_pid, uri)
    finally:
        gone = subprocess.run(tool.argv("detach", device), capture_output=True, text=True,
                              env=env, timeout=120)
        if gone.returncode != 0:
            print(f"  detach {device} failed ({gone.returncode}): {gone.stderr.strip()}",
                  file=sys.stderr, flush=True)


def row_name(job: FioJob, metric: Metric) -> str:
    return f"{job.name} {metric.unit}"


def measure(jobs: list[FioJob], targets: list[Attached], settings: Settings,
            loads: list[float]) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {}
    for job in jobs:
        for repeat in range(settings.repeat):
            # Interleave the columns within each repeat so a noisy minute hurts both.
            for target in targets:
                values = job.run(target, settings)
                loads.append(os.getloadavg()[0])
                shown = ", ".join(f"{values[m.key]:,.1f} {m.unit}" for m in job.metrics
                                  if m.key in values)
                print(f"  {job.name} #{repeat + 1} {target.label}: {shown}", flush=True)
                for metric in (m for m in job.metrics if m.key in values):
                    samples.setdefault(row_name(job, metric), {}).setdefault(
                        target.label, []).append(values[metric.key])
    return samples


def multi_conn(uri: str) -> bool:
    done = subprocess.run(["nbdinfo", "--can", "multi-conn", uri], capture_output=True,
                          timeout=30)
    return done.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s runs instead of 10 s")
    parser.add_argument("--only", metavar="NAME", action="append",
                        help="only workloads whose name contains NAME (repeatable)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--runtime", type=int, help="seconds per fio run (overrides --quick)")
    parser.add_argument("--servers", default="minidisk,nbdkit",
                        help="comma-separated subset of minidisk,nbdkit")
    parser.add_argument("--protocol", action="store_true",
                        help="also run each job with fio's nbd engine straight to each "
                             "server (columns 'NAME nbd'): what the path costs, same run")
    parser.add_argument("--cprofile", metavar="FILE", type=Path,
                        help="run the minidisk server under cProfile, stats to FILE")
    parser.add_argument("--busy-poll-us", type=int, default=0, metavar="US",
                        help="start the minidisk server with --busy-poll-us US")
    parser.add_argument("--snapshot", metavar="REV",
                        help="run minidisk (server and attach) from `git archive REV src`")
    args = parser.parse_args()

    runtime_s = args.runtime or (3 if args.quick else 10)
    settings = Settings(runtime_s, args.repeat)
    jobs = [j for j in FIO_JOBS if not args.only or any(w in j.name for w in args.only)]
    server_names = [s for s in args.servers.split(",") if s]

    started, report = begin("minidisk user-path bench (fio libaio direct=1 on nbdfuse + loop)",
                            runtime_s, args.repeat)
    loads: list[float] = []
    with scratch_directories("minidisk-bench-user-") as (scratch, shm):
        source = shm / "source.img"
        make_source_image(source)
        src = snapshot(args.snapshot, scratch) if args.snapshot else None
        server_tool = Minidisk(src, args.cprofile.resolve() if args.cprofile else None,
                               ("--busy-poll-us", str(args.busy_poll_us))
                               if args.busy_poll_us else ())
        attach_tool = Minidisk(src)  # never profiled: only the server is
        # A state directory of our own: our attachments are not mixed with anyone else's.
        env = {**os.environ, "MINIDISK_STATE_DIR": str(scratch / "state")}
        if src is not None:
            env["PYTHONPATH"] = str(src)
        servers = {
            "minidisk": (Server("minidisk", server_tool.argv(
                "serve", "-s", "--memory", f"disk={DEVICE_SIZE}",
                f"unix://{scratch / 'minidisk.sock'}"), scratch / "minidisk.sock",
                scratch / "minidisk.log", server_tool.env()), "disk"),
            "nbdkit": (Server("nbdkit", ["nbdkit", "-f", "-U", str(scratch / "nbdkit.sock"),
                                         "memory", str(DEVICE_SIZE)],
                              scratch / "nbdkit.sock", scratch / "nbdkit.log"), ""),
        }
        with ExitStack() as stack:
            targets = []
            for name in server_names:
                server, export = servers[name]
                stack.enter_context(running(server, export))
                uri = nbd_uri(server.socket, export)
                # Read rows must read data, not holes; filled over the socket, before attach.
                print(f"  prefill {name}", flush=True)
                nbdcopy(str(source), uri)
                report.setdefault("multi_conn", {})[name] = multi_conn(uri)
                targets.append(stack.enter_context(attached(name, uri, server, attach_tool,
                                                            env)))
            if args.protocol:
                targets += [Attached(f"{t.label} nbd", "", t.server_pid, None, t.uri)
                            for t in list(targets)]
            print(f"multi-conn advertised: {report['multi_conn']} "
                  "(nbdfuse opens 4 connections where it is, 1 where not)", flush=True)
            samples = measure(jobs, targets, settings, loads)

    ratios = [("minidisk", "nbdkit")] if {"minidisk", "nbdkit"} <= set(server_names) else []
    columns = list(server_names)
    if args.protocol:
        columns += [f"{name} nbd" for name in server_names]
        ratios += [(f"{a} nbd", f"{b} nbd") for a, b in ratios]
    lines, medians = median_table(samples, columns, ratios)
    verdicts = [v for goal in GOALS for v in goal.check(medians)]
    report["userpath"] = {"samples": samples, "medians": medians}
    output = ["", "## user path: fio libaio direct=1 on nbdfuse + loop"
              + (" ('nbd' columns: fio's nbd engine, no path)" if args.protocol else "")
              + " (medians; CPU rows: lower is better)", "", *lines]
    finish(report, output, loads, verdicts, f"userpath-{started}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
