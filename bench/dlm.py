#!/usr/bin/env python3
"""Speed of the lock manager (issue 5, "Speed"): lock+unlock rate, handoff latency between two
processes and contended throughput with 1, 2, 4 and 8 clients, through the Python API (on
asyncio and on trio) and through dlmfs, next to flock(2) on a local file and PostgreSQL
advisory locks. dlmfs three ways in the same run: its cached path (a mount is a node; the
handoff goes between two mounts), `--exclusive` (processes of one mount exclude each other)
and the per-process dlmfs of before the cache (its own lock manager, from OLD_DLMFS).

    .venv/bin/python bench/dlm.py                  # 3 s per sample, median of 3
    .venv/bin/python bench/dlm.py --quick          # 1 s per sample
    .venv/bin/python bench/dlm.py --only api-asyncio,dlmfs --rows 1
    .venv/bin/python bench/dlm.py --snapshot HEAD~3  # the lock manager from a commit
    .venv/bin/python bench/dlm.py --only api-asyncio,dlmfs,dlmfs-exclusive,dlmfs-old \
        --rows 1,handoff                           # dlmfs's cache against the lock manager

Every sample runs in fresh worker processes (this script run as `_worker`), which wait for a
common start time on CLOCK_MONOTONIC, loop until a common stop time and report what they did.
Prints a Markdown table of medians and writes every sample to bench/results/dlm-<time>.json.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import process_cpu_s  # noqa: E402  (bench/ is a directory of scripts, not a package)

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
RESULTS_DIR = Path(__file__).resolve().parent / "results"

COLUMNS = ["api-asyncio", "api-trio", "dlmfs", "dlmfs-exclusive", "dlmfs-old", "flock",
           "postgres"]
# dlmfs as it was before a mount became a node (409e59c): one lock manager lock per open file
# description, taken at open and released at close.
OLD_DLMFS = "409e59c^"
CLIENTS = [1, 2, 4, 8]
HOLD_S = 0.002      # handoff: how long a holder keeps the lock (the other one queues meanwhile)
REQUEUE_S = 0.0005  # handoff: pause after a release before asking again (flock is not fair)
TARGETS = {"api-asyncio": 20_000.0, "api-trio": 20_000.0, "dlmfs": 3_000.0}


# -- workers (run in their own processes) ------------------------------------------------------

def _ready() -> tuple[float, float]:
    """Tell the parent this worker is set up (imports done, connected, lock file found) and
    read the common (start, stop) times it answers once every worker is; then wait for the
    start. Starting at a fixed time after spawning instead made slow starters (8 processes
    importing trio on a loaded 2-core VM can take seconds) miss most of the interval, which
    showed up as a "collapse" of the 8-client rate to tens per second."""
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    start, stop = float(line[0]), float(line[1])
    delay = start - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    _cpu_at_start[0] = time.process_time()
    return start, stop


_cpu_at_start = [0.0]  # the worker's CPU time when its loop began


class _Pg:
    """Just enough of the PostgreSQL wire protocol (v3, simple query, trust auth) to take
    advisory locks without a driver."""

    def __init__(self, sockdir: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(f"{sockdir}/.s.PGSQL.{port}")
        self.file = self.sock.makefile("rb")
        body = struct.pack("!I", 196608) + b"user\0postgres\0database\0postgres\0\0"
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        self._until_ready()

    def _until_ready(self) -> None:
        while True:
            kind, length = struct.unpack("!cI", self.file.read(5))
            body = self.file.read(length - 4)
            if kind == b"E":
                raise RuntimeError(f"postgres: {body!r}")
            if kind == b"R" and struct.unpack("!I", body[:4])[0] != 0:
                raise RuntimeError("postgres wants a password; the bench expects trust")
            if kind == b"Z":
                return

    def query(self, sql: bytes) -> None:
        self.sock.sendall(b"Q" + struct.pack("!I", len(sql) + 5) + sql + b"\0")
        self._until_ready()


def _locker(kind: str, target: str) -> tuple[Callable[[], None], Callable[[], None],
                                             Callable[[], None]]:
    """(lock, unlock, close) for the blocking kinds."""
    if kind.startswith("dlmfs"):
        fds: list[int] = []

        def lock() -> None:
            fds.append(os.open(target, os.O_RDWR))

        def unlock() -> None:
            os.close(fds.pop())

        return lock, unlock, lambda: None
    if kind == "flock":
        import fcntl
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        return (lambda: fcntl.flock(fd, fcntl.LOCK_EX), lambda: fcntl.flock(fd, fcntl.LOCK_UN),
                lambda: os.close(fd))
    if kind == "postgres":
        sockdir, port = target.rsplit(":", 1)
        pg = _Pg(sockdir, int(port))
        return (lambda: pg.query(b"SELECT pg_advisory_lock(42)"),
                lambda: pg.query(b"SELECT pg_advisory_unlock(42)"), pg.sock.close)
    raise SystemExit(f"unknown kind {kind}")


def _worker_sync(kind: str, test: str, target: str) -> Any:
    lock, unlock, close = _locker(kind, target)
    try:
        _, stop = _ready()
        if test == "rate":
            n = 0
            while time.monotonic() < stop:
                lock()
                unlock()
                n += 1
            return n
        spans = []
        while time.monotonic() < stop:
            lock()
            granted = time.monotonic()
            time.sleep(HOLD_S)
            released = time.monotonic()
            unlock()
            spans.append((granted, released))
            time.sleep(REQUEUE_S)
        return spans
    finally:
        close()


async def _worker_api(test: str, url: str) -> Any:
    import anyio

    from minidisk.dlm.client import connect
    from minidisk.dlm.modes import Mode

    async with connect(url, name=f"bench {os.getpid()}") as client:
        lock = client.lock("bench", "lk", Mode.EX)
        # Blocking the loop while waiting for the start is harmless (nothing is in flight);
        # a worker thread (anyio.to_thread) left idle in the process made trio's 8-client
        # row several times slower under load.
        _, stop = _ready()
        if test == "rate":
            n = 0
            while time.monotonic() < stop:
                await lock.acquire()
                await lock.release()
                n += 1
            return n
        spans = []
        while time.monotonic() < stop:
            await lock.acquire()
            granted = time.monotonic()
            await anyio.sleep(HOLD_S)
            released = time.monotonic()
            await lock.release()
            spans.append((granted, released))
            await anyio.sleep(REQUEUE_S)
        return spans


def worker_main(argv: list[str]) -> None:
    kind, test, target = argv[0], argv[1], argv[2]
    if kind.startswith("api-"):
        import anyio
        result = anyio.run(_worker_api, test, target, backend=kind.removeprefix("api-"))
    else:
        result = _worker_sync(kind, test, target)
    print(json.dumps({"result": result, "cpu": time.process_time() - _cpu_at_start[0]}),
          flush=True)


# -- running samples -------------------------------------------------------------------------

class Bench:
    def __init__(self, env: dict[str, str], seconds: float) -> None:
        self.env = env
        self.seconds = seconds
        self.targets: dict[str, str] = {}
        # The two handoff workers' targets where they differ (dlmfs: one mount each, since
        # two processes of one mount share its cached lock).
        self.handoff_targets: dict[str, tuple[str, str]] = {}
        self.per_worker: list[dict[str, Any]] = []  # each rate sample's cycles per worker
        self.cpu_us_per_cycle: dict[tuple[str, int], list[float]] = {}
        # The CPU of the column's own processes (workers in their loop, lock manager, mounts):
        # unlike the machine's, not inflated by whatever else runs.
        self.own_cpu_us_per_cycle: dict[tuple[str, int], list[float]] = {}
        self.services: dict[str, tuple[str, ...]] = {}  # column -> SERVICES names
        self.worker_cpu_s = 0.0

    def _run_workers(self, kind: str, test: str, count: int,
                     targets: tuple[str, ...] | None = None) -> list[Any]:
        procs = [subprocess.Popen([PYTHON, __file__, "_worker", kind, test,
                                   targets[i] if targets else self.targets[kind]],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=self.env)
                 for i in range(count)]
        try:
            for proc in procs:  # every worker set up before anyone starts
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"{kind} {test} worker did not start: {line!r}")
            start = time.monotonic() + 0.05
            stop = start + self.seconds
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(f"{start!r} {stop!r}\n")
                proc.stdin.flush()
            results = []
            self.worker_cpu_s = 0.0
            for proc in procs:
                out, _ = proc.communicate(timeout=self.seconds + 60)
                if proc.returncode != 0:
                    raise RuntimeError(f"{kind} {test} worker failed ({proc.returncode})")
                report = json.loads(out.strip().splitlines()[-1])
                results.append(report["result"])
                self.worker_cpu_s += report["cpu"]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if time.monotonic() < stop:
            raise RuntimeError("workers ended before the stop time")
        return results

    def rate(self, kind: str, clients: int) -> float:
        busy = cpu_busy_s()
        services = [SERVICES[name] for name in self.services.get(kind, ())]
        own = sum(map(process_cpu_s, services))
        counts = self._run_workers(kind, "rate", clients)
        busy = cpu_busy_s() - busy  # includes start-up and tear-down of the workers
        own = sum(map(process_cpu_s, services)) - own + self.worker_cpu_s
        if sum(counts):
            self.cpu_us_per_cycle.setdefault((kind, clients), []).append(
                busy / sum(counts) * 1e6)
            self.own_cpu_us_per_cycle.setdefault((kind, clients), []).append(
                own / sum(counts) * 1e6)
        self.per_worker.append({"kind": kind, "clients": clients, "counts": counts})
        return float(sum(counts)) / self.seconds

    def handoff_us(self, kind: str) -> float | None:
        spans = [(g, r, who) for who, result in
                 enumerate(self._run_workers(kind, "handoff", 2,
                                             self.handoff_targets.get(kind)))
                 for g, r in result]
        spans.sort()
        gaps = [(b[0] - a[1]) * 1e6 for a, b in itertools.pairwise(spans)
                if a[2] != b[2]]
        return statistics.median(gaps) if gaps else None


def cpu_busy_s() -> float:
    """CPU time the whole machine has spent not idle, in seconds (from /proc/stat): what a
    sample cost, busy-polling included, whoever spent it (workers, service, dlmfs)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def load1() -> float:
    return os.getloadavg()[0]


# -- servers ---------------------------------------------------------------------------------

def _stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


SERVICES: dict[str, int] = {}  # lock managers and mounts by name: their pids


@contextmanager
def dlm_server(tmp: Path, env: dict[str, str], name: str = "dlm") -> Iterator[str]:
    path = tmp / f"{name}.sock"
    proc = subprocess.Popen([PYTHON, "-m", "minidisk", "dlm", "serve", "-f", f"unix://{path}"],
                            stdout=subprocess.PIPE, text=True, env=env)
    SERVICES[name] = proc.pid
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on"):
            raise RuntimeError(f"dlm serve did not start: {line!r}")
        yield f"unix://{path}"
    finally:
        _stop(proc)


@contextmanager
def dlmfs_mount(tmp: Path, url: str, env: dict[str, str], name: str = "mnt",
                domain: str = "bench", *options: str) -> Iterator[Path]:
    """A dlmfs mount on TMP/NAME and its lock file DOMAIN/lk. Columns sharing a lock manager
    use domains of their own: a lock cached by one column's mount would otherwise be handed
    to and fro with another's."""
    mnt = tmp / name
    mnt.mkdir()
    proc = subprocess.Popen([PYTHON, "-m", "minidisk", "dlmfs", "-f", str(mnt), "--server", url,
                             *options], env=env)
    SERVICES[name] = proc.pid
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dlmfs did not mount")
            time.sleep(0.05)
        (mnt / domain).mkdir()
        os.close(os.open(mnt / domain / "lk", os.O_CREAT | os.O_RDONLY, 0o644))
        yield mnt / domain / "lk"
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            _stop(proc)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


@contextmanager
def postgres_server(tmp: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a unix socket (trust auth, fsync off), when its
    binaries are installed; yields "SOCKDIR:PORT". Raises LookupError when there are none."""
    initdb, postgres = _pg_bin("initdb"), _pg_bin("postgres")
    if initdb is None or postgres is None:
        raise LookupError("no PostgreSQL server binaries (initdb, postgres) found")
    # Its own directory straight under /tmp: the postgres user cannot enter ours (0700).
    base = Path(tempfile.mkdtemp(prefix="minidisk-bench-pg-", dir="/tmp"))
    base.chmod(0o777)
    data = base / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres",
                        "--no-sync"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        shutil.rmtree(base, ignore_errors=True)
        raise LookupError(f"initdb failed: {err.stderr.strip()[-200:]}") from None
    port = 5432
    proc = subprocess.Popen([*as_user, postgres, "-D", str(data), "-k", str(base), "-p",
                             str(port), "-c", "listen_addresses=", "-c", "fsync=off",
                             "-c", "max_connections=30"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _Pg(str(base), port).sock.close()
                break
            except (OSError, RuntimeError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise LookupError("the throwaway PostgreSQL server did not start") from None
                time.sleep(0.1)
        yield f"{base}:{port}"
    finally:
        _stop(proc, signal.SIGINT)  # fast shutdown
        shutil.rmtree(base, ignore_errors=True)


def snapshot_env(tmp: Path, rev: str | None, name: str = "snapshot"
                 ) -> tuple[dict[str, str], str]:
    env = dict(os.environ)
    if rev is None:
        return env, "working tree"
    dest = tmp / name
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    env["PYTHONPATH"] = str(dest / "src")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    return env, f"snapshot {rev} ({commit})"


# -- main ------------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s per sample instead of 3")
    parser.add_argument("--seconds", type=float, help="seconds per sample")
    parser.add_argument("--repeat", type=int, default=3, help="samples per cell (median)")
    parser.add_argument("--only", help=f"comma-separated columns out of {','.join(COLUMNS)}")
    parser.add_argument("--rows", default="1,2,4,8,handoff",
                        help="client counts and/or 'handoff' (default: 1,2,4,8,handoff)")
    parser.add_argument("--snapshot", metavar="REV",
                        help="run the lock manager, client and dlmfs from a git revision")
    parser.add_argument("--busy-poll-us", metavar="US",
                        help="the lock manager's and clients' busy-poll budget "
                             "($MINIDISK_DLM_BUSY_POLL_US; 0 = off; default: the code's)")
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--cpus", metavar="LIST",
                        help="run everything (servers, mount, workers) on these CPUs, e.g. 0 "
                             "or 0,1: where the scheduler puts the processes changes the "
                             "figures more than most code changes (see bench/README.md)")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})  # inherited
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    columns = args.only.split(",") if args.only else list(COLUMNS)
    for col in columns:
        if col not in COLUMNS:
            parser.error(f"unknown column {col!r}")
    rows = args.rows.split(",")
    counts = [int(r) for r in rows if r != "handoff"]
    started_uptime = uptime()
    print(f"uptime at start: {started_uptime}", flush=True)
    placement = f"CPUs {args.cpus}" if args.cpus else "CPUs as the scheduler likes"
    notes: list[str] = []
    samples: dict[str, dict[str, list[float | None]]] = {col: {} for col in columns}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="minidisk-bench-dlm-",
                                                                    dir="/tmp")))
        env, code = snapshot_env(tmp, args.snapshot)
        if args.busy_poll_us is not None:
            env["MINIDISK_DLM_BUSY_POLL_US"] = args.busy_poll_us
        polling = env.get("MINIDISK_DLM_BUSY_POLL_US", "default")
        code = f"{code}, busy poll {polling} µs"
        print(f"code: {code}; {seconds:g} s per sample, median of {args.repeat}", flush=True)
        bench = Bench(env, seconds)
        if any(c.startswith("api-") or c in ("dlmfs", "dlmfs-exclusive") for c in columns):
            url = stack.enter_context(dlm_server(tmp, env))
            bench.targets["api-asyncio"] = bench.targets["api-trio"] = url
            bench.services.update({"api-asyncio": ("dlm",), "api-trio": ("dlm",),
                                   "dlmfs": ("dlm", "mnt", "mnt-b"),
                                   "dlmfs-exclusive": ("dlm", "mnt-x")})
            if "dlmfs" in columns:
                bench.targets["dlmfs"] = str(stack.enter_context(
                    dlmfs_mount(tmp, url, env, "mnt", "bench-fs")))
                other = str(stack.enter_context(dlmfs_mount(tmp, url, env, "mnt-b", "bench-fs")))
                bench.handoff_targets["dlmfs"] = (bench.targets["dlmfs"], other)
            if "dlmfs-exclusive" in columns:
                bench.targets["dlmfs-exclusive"] = str(stack.enter_context(
                    dlmfs_mount(tmp, url, env, "mnt-x", "bench-x", "--exclusive")))
        if "dlmfs-old" in columns:
            # Its own lock manager too: the protocol has changed since.
            old_env, old_code = snapshot_env(tmp, OLD_DLMFS, "old-dlmfs")
            if args.busy_poll_us is not None:
                old_env["MINIDISK_DLM_BUSY_POLL_US"] = args.busy_poll_us
            old_url = stack.enter_context(dlm_server(tmp, old_env, "old-dlm"))
            bench.targets["dlmfs-old"] = str(stack.enter_context(
                dlmfs_mount(tmp, old_url, old_env, "mnt-old")))
            bench.services["dlmfs-old"] = ("old-dlm", "mnt-old")
            notes.append(f"dlmfs-old: dlmfs and its lock manager from {old_code}")
        if "flock" in columns:
            bench.targets["flock"] = str(tmp / "flock.lk")
        if "postgres" in columns:
            if args.no_postgres:
                columns.remove("postgres")
                notes.append("postgres: skipped (--no-postgres)")
            else:
                try:
                    bench.targets["postgres"] = stack.enter_context(postgres_server(tmp))
                except (LookupError, subprocess.CalledProcessError, OSError) as err:
                    columns.remove("postgres")
                    notes.append(f"postgres: skipped ({err})")
        for note in notes:
            print(note, flush=True)
        loads: list[float] = []
        for rep in range(args.repeat):
            for row in rows:
                for col in columns:
                    value: float | None
                    if row == "handoff":
                        value = bench.handoff_us(col)
                    else:
                        value = bench.rate(col, int(row))
                    samples[col].setdefault(row, []).append(value)
                    loads.append(load1())
                    print(f"  [{rep + 1}/{args.repeat}] {col:<12} {row:<8} {fmt(value)}"
                          f"   (load {loads[-1]:.2f})", flush=True)

    def median(col: str, row: str) -> float | None:
        values = [v for v in samples[col].get(row, []) if v is not None]
        return statistics.median(values) if values else None

    print()
    print(f"Lock manager bench ({code}; {placement}); medians of {args.repeat} samples of "
          f"{seconds:g} s")
    print()
    print("| measurement | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for count in counts:
        label = ("lock+unlock/s, 1 client (uncontended)" if count == 1
                 else f"lock+unlock/s, {count} clients on one lock")
        print(f"| {label} | " + " | ".join(fmt(median(c, str(count))) for c in columns) + " |")
        if count == 1:
            print("| µs per lock+unlock, 1 client | " + " | ".join(
                fmt(None if (m := median(c, "1")) is None else 1e6 / m, 1) for c in columns)
                + " |")
    if "1" in rows:
        print("| machine CPU µs per lock+unlock, 1 client | " + " | ".join(
            fmt(statistics.median(v), 1) if (v := bench.cpu_us_per_cycle.get((c, 1))) else "-"
            for c in columns) + " |")
        print("| CPU µs per lock+unlock of the column's processes (client, lock manager, "
              "mounts), 1 client | " + " | ".join(
                  fmt(statistics.median(v), 1)
                  if (v := bench.own_cpu_us_per_cycle.get((c, 1))) else "-"
                  for c in columns) + " |")
    if "handoff" in rows:
        print("| handoff latency µs (median) | " + " | ".join(
            fmt(median(c, "handoff"), 1) for c in columns) + " |")
    print()
    for col, target in TARGETS.items():
        if col in columns and "1" in rows:
            got = median(col, "1")
            verdict = "met" if got is not None and got >= target else "NOT MET"
            print(f"- target {col} uncontended ≥ {target:,.0f}/s: {fmt(got)}/s, {verdict}")
    for col in columns:
        spreads = [min(w["counts"]) / max(w["counts"]) for w in bench.per_worker
                   if w["kind"] == col and w["clients"] == max(counts) > 1 and max(w["counts"])]
        if spreads:
            print(f"- {col}, {max(counts)} clients: the slowest worker made "
                  f"{statistics.median(spreads):.0%} of the fastest one's cycles (median)")
    for note in notes:
        print(f"- {note}")
    ended_uptime = uptime()
    print(f"- uptime at start: {started_uptime}")
    print(f"- uptime at end:   {ended_uptime}")
    if loads:
        print(f"- 1-minute load during the samples: min {min(loads):.2f}, "
              f"median {statistics.median(loads):.2f}, max {max(loads):.2f} (2 cores)")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"dlm-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"code": code, "cpus": args.cpus, "seconds": seconds,
                               "repeat": args.repeat,
                               "samples": samples, "per_worker": bench.per_worker,
                               "cpu_us_per_cycle": {f"{k} {n}": v for (k, n), v in
                                                    bench.cpu_us_per_cycle.items()},
                               "own_cpu_us_per_cycle": {
                                   f"{k} {n}": v
                                   for (k, n), v in bench.own_cpu_us_per_cycle.items()},
                               "notes": notes, "loads": loads,
                               "uptime": [started_uptime, ended_uptime]}, indent=1))
    print(f"- samples: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2:])
    else:
        sys.exit(main())
