"""`--metrics tcp://IP:PORT/`: the server's figures for Prometheus, on the server's own loop.

The text is prometheus-client's exposition of a collector that reads the figures at scrape
time (nbd/stats.py: per export and command, requests, bytes, errors by errno, the timed
sample's latency histogram; open connections), so nothing is kept twice and a scrape sees
one consistent moment: the collector runs on the event loop, between requests.

The HTTP side is the least a scraper needs (GET /metrics, HTTP/1.0 semantics, the connection
closed after the reply) and is bounded like the NBD side: a request head over HEAD_LIMIT
bytes or slower than HEAD_TIMEOUT is dropped, and at most MAX_SCRAPERS are served at once.
It listens on loopback by default and serves figures only; what to expose beyond the host
is the operator's call (the listen address).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from minidisk.dlm.figures import DlmFigures
from minidisk.histogram import as_json
from minidisk.nbd.listen import parse_url
from minidisk.nbd.transport import Transport

log = logging.getLogger(__name__)

HEAD_LIMIT = 8192  # bytes of request line and headers
HEAD_TIMEOUT = 10.0  # seconds to send them
MAX_SCRAPERS = 16  # connections served at once; more are closed at once


def _buckets(latency_us: dict[str, int]) -> list[tuple[str, int]]:
    """An as_json() histogram (minidisk.histogram) as Prometheus's cumulative buckets, in
    seconds, ending with +Inf."""
    buckets, seen = [], 0
    for bound, count in sorted(latency_us.items(), key=lambda item: int(item[0])):
        seen += count
        buckets.append((repr(int(bound) / 1e6), seen))
    buckets.append(("+Inf", seen))
    return buckets


class FiguresCollector:
    """A prometheus-client collector over `figures()`, the per-export part of the `stats`
    control command's result (exports → connections, open, commands), and the hosted lock
    manager's figures, if any."""

    def __init__(self, figures: Callable[[], dict[str, dict[str, Any]]],
                 dlm: Callable[[], DlmFigures | None] = lambda: None) -> None:
        self.figures = figures
        self.dlm = dlm

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("minidisk_requests", "NBD requests served",
                                       labels=["export", "command"])
        payload = CounterMetricFamily("minidisk_request_bytes",
                                      "Bytes the requests covered (read, written, trimmed, "
                                      "zeroed)", labels=["export", "command"])
        errors = CounterMetricFamily("minidisk_request_errors", "Requests that failed",
                                     labels=["export", "command", "errno"])
        latency = HistogramMetricFamily("minidisk_request_latency_seconds",
                                        "Service time of the timed sample (requests whose "
                                        "cookie is a multiple of 16)", labels=["export", "command"])
        opened = CounterMetricFamily("minidisk_connections_opened",
                                     "Connections that opened the export",
                                     labels=["export"])
        connected = GaugeMetricFamily("minidisk_connections", "Connections open now",
                                      labels=["export"])
        for name, export in self.figures().items():
            export_name = name.lstrip("/")
            opened.add_metric([export_name], export["connections"])
            connected.add_metric([export_name], export["open"])
            for command, row in export["commands"].items():
                labels = [export_name, command]
                requests.add_metric(labels, row["requests"])
                payload.add_metric(labels, row["bytes"])
                for err, count in row["errors"].items():
                    errors.add_metric([*labels, err], count)
                latency.add_metric(labels, _buckets(row["latency_us"]),
                                   sum_value=row["latency_sum_us"] / 1e6)
        yield from (requests, payload, errors, latency, opened, connected)
        dlm = self.dlm()
        if dlm is not None:
            yield from self._lock_manager(dlm)

    @staticmethod
    def _lock_manager(dlm: DlmFigures) -> Iterator[Metric]:
        """The hosted lock manager's (--dlm) grants and waits (dlm/figures.py)."""
        grants = CounterMetricFamily("minidisk_dlm_grants", "Locks granted",
                                     labels=["when"])
        grants.add_metric(["at_once"], dlm.granted_at_once)
        grants.add_metric(["after_wait"], dlm.granted_after_wait)
        yield grants
        yield CounterMetricFamily("minidisk_dlm_waits", "Lock requests that queued",
                                  value=dlm.waited)
        yield CounterMetricFamily("minidisk_dlm_refusals", "Lock requests answered with an "
                                  "error", value=dlm.refused)
        yield GaugeMetricFamily("minidisk_dlm_waiting", "Lock requests queued now",
                                value=dlm.waiting())
        wait = HistogramMetricFamily("minidisk_dlm_wait_seconds",
                                     "From a queued request to its grant")
        wait.add_metric([], _buckets(as_json(dlm.wait_latency)), sum_value=dlm.wait_ns / 1e9)
        yield wait


class MetricsEndpoint:
    def __init__(self, collector: FiguresCollector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.server: asyncio.base_events.Server | None = None
        self.serving = 0

    async def start(self, url: str) -> None:
        address = parse_url(url)
        if address.kind is not Transport.TCP:
            raise ValueError(f"--metrics {url}: give tcp://IP:PORT/ (Prometheus scrapes HTTP)")
        self.server = await asyncio.start_server(self._serve, address.host, address.port,
                                                 limit=HEAD_LIMIT)

    def address(self) -> tuple[str, int]:
        """Where it listens (the port the kernel chose for a port 0)."""
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.serving >= MAX_SCRAPERS:
            writer.close()
            return
        self.serving += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError):
                return
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0]
            if method != b"GET":
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path.split(b"?", 1)[0] not in (b"/metrics", b"/"):
                status, body, kind = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                status, body, kind = "200 OK", generate_latest(self.registry), \
                    CONTENT_TYPE_LATEST
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        finally:
            self.serving -= 1
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
