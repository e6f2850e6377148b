"""`serve --metrics`: Prometheus's text over HTTP, the same figures as `minidisk stats`, and an
HTTP side as bounded as the NBD one."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tests import harness
from tests.harness import SYSTEM_PYTHON, scaled

from minidisk.daemon.metrics import HEAD_LIMIT, MAX_SCRAPERS
from minidisk.dlm.client import connect
from minidisk.dlm.modes import Mode

READS = """
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(20):
    h.pread(4096, i * 4096)
h.shutdown()
"""


def _metrics_port(server: harness.Server) -> int:
    deadline = time.monotonic() + scaled(30)
    while True:
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.log_text())
        if found:
            return int(found.group(1))
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.02)


def _scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=scaled(30)) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=")
        return str(reply.read().decode())


def test_the_figures_of_stats_as_prometheus_reads_them(short_tmp: Path) -> None:
    server = harness.serve(short_tmp, "--memory", "d=1M", "--metrics", "tcp://127.0.0.1:0/",
                           verbose=True)
    try:
        port = _metrics_port(server)
        subprocess.run([SYSTEM_PYTHON, "-c", READS, server.uri("d")], check=True,
                       timeout=scaled(60))
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(_scrape(port))
                   for s in family.samples}
        read = (("command", "READ"), ("export", "d"))
        assert samples[("minidisk_requests_total", read)] == 20
        assert samples[("minidisk_request_bytes_total", read)] == 20 * 4096
        # Timed: cookie 16 (libnbd counts from 1).
        assert samples[("minidisk_request_latency_seconds_count", read)] == 1
        assert samples[("minidisk_request_latency_seconds_bucket", (*read[:1], ("export", "d"),
                                                                    ("le", "+Inf")))] == 1
        assert samples[("minidisk_connections_opened_total", (("export", "d"),))] == 1
        assert samples[("minidisk_connections", (("export", "d"),))] == 0
        try:
            _scrape(port, "/other")
            raise AssertionError("a path other than /metrics was served")
        except urllib.error.HTTPError as e:
            assert e.code == 404
    finally:
        server.stop()


def test_an_oversized_request_head_is_dropped_and_scrapers_are_bounded(short_tmp: Path) -> None:
    server = harness.serve(short_tmp, "--memory", "d=1M", "--metrics", "tcp://127.0.0.1:0/",
                           verbose=True)
    held = []
    try:
        port = _metrics_port(server)
        flood = socket.create_connection(("127.0.0.1", port), timeout=scaled(30))
        flood.sendall(b"GET /metrics HTTP/1.0\r\nX: " + b"a" * (HEAD_LIMIT + 1))
        assert flood.recv(4096) == b""  # hung up on, unanswered
        flood.close()
        for _ in range(MAX_SCRAPERS):  # each sends nothing: held until the head timeout
            held.append(socket.create_connection(("127.0.0.1", port), timeout=scaled(30)))
        time.sleep(0.5)
        extra = socket.create_connection(("127.0.0.1", port), timeout=scaled(30))
        assert extra.recv(4096) == b""  # over the limit: closed at once
        extra.close()
        for sock in held:
            sock.close()
        deadline = time.monotonic() + scaled(30)
        while True:  # the slots come back once the held connections are gone
            try:
                assert "minidisk_connections" in _scrape(port)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_the_hosted_lock_managers_grants_and_waits(short_tmp: Path) -> None:
    dlm_url = f"unix://{short_tmp}/dlm.sock"
    server = harness.serve(short_tmp, "--memory", "d=1M", "--dlm", dlm_url,
                           "--metrics", "tcp://127.0.0.1:0/", verbose=True)

    async def contend() -> None:
        async with connect(dlm_url, name="first") as first, \
                connect(dlm_url, name="second") as second:
            held = first.lock("dom", "res", Mode.EX)
            assert await held.acquire()
            waiter = second.lock("dom", "res", Mode.EX)
            waiting = asyncio.ensure_future(waiter.acquire())
            await asyncio.sleep(0.3)
            assert not waiting.done()
            await held.release(wait=True)
            assert await waiting
            await waiter.release(wait=True)

    try:
        port = _metrics_port(server)
        asyncio.run(contend())
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(_scrape(port))
                   for s in family.samples}
        assert samples[("minidisk_dlm_grants_total", (("when", "at_once"),))] == 1
        assert samples[("minidisk_dlm_grants_total", (("when", "after_wait"),))] == 1
        assert samples[("minidisk_dlm_waits_total", ())] == 1
        assert samples[("minidisk_dlm_waiting", ())] == 0
        assert samples[("minidisk_dlm_wait_seconds_count", ())] == 1
        assert samples[("minidisk_dlm_wait_seconds_sum", ())] >= 0.3  # it waited that long
    finally:
        server.stop()
