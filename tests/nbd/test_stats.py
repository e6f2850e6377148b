"""Request figures (nbd/stats.py): what libnbd sends is what `minidisk stats` counts, per
export across connections, errors by errno, latencies in their buckets."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

from tests import harness
from tests.harness import SYSTEM_PYTHON, run_cli, scaled

from minidisk.histogram import bucket_bound_us, percentile_us
from minidisk.nbd import protocol as p
from minidisk.nbd.stats import ExportStats, RequestStats

# libnbd, not strict: it sends a WRITE to a read-only export instead of refusing it itself.
CLIENT = """
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
for i in range(20):
    h.pread(4096, i * 4096)
h.pwrite(bytes(8192), 0) if sys.argv[2] == "rw" else None
try:
    h.pwrite(bytes(512), 0) if sys.argv[2] == "ro" else None
except nbd.Error as e:
    print(e.errno)
h.flush()
h.shutdown()
"""


def _client(uri: str, mode: str) -> str:
    return subprocess.run([SYSTEM_PYTHON, "-c", CLIENT, uri, mode], capture_output=True,
                          text=True, check=True, timeout=scaled(60)).stdout


def test_figures_of_closed_and_open_connections_add_up() -> None:
    closed = RequestStats()
    closed.requests[p.CMD_READ] = 3
    closed.bytes[p.CMD_READ] = 3 * 4096
    closed.latency[p.CMD_READ][4] = 3
    live = RequestStats()
    live.requests[p.CMD_READ] = 1
    live.bytes[p.CMD_READ] = 512
    live.latency[p.CMD_READ][10] = 1
    live.latency_ns[p.CMD_READ] = 1000_500
    live.refused(p.CMD_WRITE, p.NBD_EPERM)
    live.refused(99, p.NBD_EINVAL)
    exports = ExportStats()
    exports.opened("d")
    exports.opened("d")
    exports.closed_connection("d", closed)
    closed.requests[p.CMD_READ] = 1000  # the export kept a copy, not this object
    snapshot = exports.snapshot([("d", live)])
    assert snapshot == {"d": {"connections": 2, "open": 1, "commands": {
        "READ": {"requests": 4, "bytes": 3 * 4096 + 512, "errors": {},
                 "latency_us": {"16": 3, "1049": 1}, "latency_sum_us": 1000.5},
        "WRITE": {"requests": 1, "bytes": 0, "errors": {"EPERM": 1}, "latency_us": {},
                  "latency_sum_us": 0},
        "other": {"requests": 1, "bytes": 0, "errors": {"EINVAL": 1}, "latency_us": {},
                  "latency_sum_us": 0}}}}


def test_bucket_bounds_and_percentiles() -> None:
    assert [bucket_bound_us(b) for b in range(7)] == [1, 2, 4, 8, 16, 33, 66]
    latency = {"8": 90, "66": 9, "1049": 1}
    assert percentile_us(latency, 0.5) == 8
    assert percentile_us(latency, 0.99) == 66
    assert percentile_us(latency, 1.0) == 1049
    assert percentile_us({}, 0.5) is None


def test_stats_counts_what_libnbd_sent(short_tmp: Path) -> None:
    server = harness.serve(short_tmp, "--memory", "d=1M")
    ro = harness.serve(short_tmp, "--memory", "r=1M", "--read-only", name="ro")
    try:
        _client(server.uri("d"), "rw")
        _client(server.uri("d"), "rw")
        assert _client(ro.uri("r"), "ro").strip() == "EPERM"  # from the server
        figures = json.loads(run_cli("stats", "--json", server.url, check=True).stdout)
        d = figures["exports"]["d"]
        assert d["connections"] == 2
        commands = d["commands"]
        assert {name: (row["requests"], row["bytes"], row["errors"])
                for name, row in commands.items()} == {
            "READ": (40, 40 * 4096, {}), "WRITE": (2, 2 * 8192, {}), "FLUSH": (2, 0, {})}
        # Timed: the requests whose cookie is a multiple of 16: libnbd counts from 1, so
        # each connection's 16th request (a READ).
        assert figures["latency_sample"] == 16
        assert sum(commands["READ"]["latency_us"].values()) == 2
        assert sum(sum(row["latency_us"].values()) for row in commands.values()) == 2
        assert figures["connections"] == []  # both have closed
        refused = json.loads(run_cli("stats", "--json", ro.url, check=True).stdout)
        assert refused["exports"]["r"]["commands"]["WRITE"] == {
            "requests": 1, "bytes": 0, "errors": {"EPERM": 1}, "latency_us": {},
            "latency_sum_us": 0}
        table = run_cli("stats", server.url, check=True).stdout.splitlines()
        assert table[0].split() == ["EXPORT", "CONNS", "COMMAND", "REQUESTS", "BYTES",
                                    "ERRORS", "P50_US", "P99_US"]
        assert table[1].split()[:6] == ["d", "2", "READ", "40", str(40 * 4096), "-"]
    finally:
        server.stop()
        ro.stop()


def test_an_open_connection_is_listed_with_its_own_figures(short_tmp: Path) -> None:
    server = harness.serve(short_tmp, "--memory", "d=1M")
    holder = subprocess.Popen([SYSTEM_PYTHON, "-c",
                               "import sys, nbd\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
                               "h.pread(512, 0)\nprint('read', flush=True)\nsys.stdin.read()\n",
                               server.uri("d")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "read\n"
        figures = json.loads(run_cli("stats", "--json", server.url, check=True).stdout)
        [conn] = figures["connections"]
        assert conn["peer"] == f"pid {holder.pid} (uid 0)" and conn["export"] == "d"
        assert conn["commands"]["READ"]["requests"] == 1
        assert figures["exports"]["d"]["commands"]["READ"]["bytes"] == 512
    finally:
        harness.stop_process(holder)
        server.stop()


def test_top_shows_totals_and_rates(short_tmp: Path) -> None:
    server = harness.serve(short_tmp, "--memory", "d=1M")
    try:
        _client(server.uri("d"), "rw")
        top = subprocess.Popen([harness.MINIDISK, "top", "-n", "2", "-d", "5", server.url],
                               stdout=subprocess.PIPE, text=True)
        assert top.stdout is not None
        first = ""
        while not first.endswith("\n\n"):  # the first update's block, up to its blank line
            line = top.stdout.readline()
            assert line, f"top ended before its first update ended: {first!r}"
            first += line
        _client(server.uri("d"), "rw")  # between the two updates (5 s apart)
        second, _ = top.communicate(timeout=scaled(60))
        assert top.returncode == 0
        reads = [line.split() for line in (first, second)
                 for line in [next(row for row in line.splitlines() if " READ " in row)]]
        assert reads[0][:2] == ["d", "READ"] and reads[0][4:] == ["20", "0"]
        assert reads[1][4:] == ["40", "0"] and float(reads[1][2]) > 0  # 20 more, as a rate
    finally:
        server.stop()


def test_top_on_a_terminal_is_a_rich_table(short_tmp: Path) -> None:
    server = harness.serve(short_tmp, "--memory", "d=1M")
    leader, follower = pty.openpty()
    try:
        _client(server.uri("d"), "rw")
        top = subprocess.Popen([harness.MINIDISK, "top", "-n", "1", server.url],
                               stdin=follower, stdout=follower, stderr=follower,
                               env={**os.environ, "TERM": "xterm", "COLUMNS": "100"})
        os.close(follower)
        screen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            screen += chunk
        assert top.wait(scaled(60)) == 0
    finally:
        os.close(leader)
        server.stop()
    text = screen.decode(errors="replace")
    assert "\x1b[" in text and "REQUESTS" in text, text  # drawn by rich, not plain lines
    row = next(line for line in text.splitlines() if " READ " in line)
    assert row.split()[:2] == ["d", "READ"] and row.split()[-2:] == ["20", "0"], text
