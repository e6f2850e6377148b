"""What one client can make the lock manager hold or send: a status of any size arrives whole
(in pages), and per-client caps answer a client that goes past them with an error instead of
letting it grow the service (issue 10, item 10)."""

from __future__ import annotations

import json
import subprocess

import anyio
import pytest

from minidisk.dlm import protocol
from minidisk.dlm.client import connect
from minidisk.dlm.modes import Mode

from .conftest import MINIDISK, Server  # type: ignore[import-not-found]

pytestmark = pytest.mark.timeout(120)


def cli(server: Server, *args: str) -> str:
    return subprocess.run([MINIDISK, "dlm", *args, "--server", server.url], check=True,
                          capture_output=True, text=True, timeout=60).stdout


def test_a_status_larger_than_a_frame_arrives_whole_in_the_api_and_the_cli(
        dlm_server: Server) -> None:
    names = [f"r{i:05}-" + "n" * 50 for i in range(3000)]

    async def main() -> None:
        async with connect(dlm_server.url, name="holder-" + "h" * 90) as holder:
            for name in names:
                assert await holder.lock("big", name, Mode.PR).acquire()
            status = await holder.status()
            assert len(json.dumps(status, separators=(",", ":"))) > protocol.MAX_FRAME
            (domain,) = status["domains"]
            assert [res["name"] for res in domain["resources"]] == names
            assert all(len(res["granted"]) == 1 for res in domain["resources"])
            text = await anyio.to_thread.run_sync(cli, dlm_server, "status")
            listed = [line.split()[1] for line in text.splitlines()
                      if line.startswith("  resource ")]
            assert listed == names
            assert text.count("    granted    PR") == len(names)
            raw = json.loads(await anyio.to_thread.run_sync(cli, dlm_server, "status",
                                                            "--json"))
            assert raw["domains"] == status["domains"]

    anyio.run(main)


def test_one_resource_whose_locks_fill_several_pages_arrives_whole(dlm_server: Server) -> None:
    async def main() -> None:
        async with connect(dlm_server.url, name="holder-" + "h" * 90) as holder:
            locks = [holder.lock("hot", "one", Mode.PR) for _ in range(6000)]
            for lock in locks:
                assert await lock.acquire()
            status = await holder.status()
            assert len(json.dumps(status, separators=(",", ":"))) > protocol.MAX_FRAME
            (domain,) = status["domains"]
            (res,) = domain["resources"]
            assert [lk["lkid"] for lk in res["granted"]] == sorted(
                lk["lkid"] for lk in res["granted"])
            assert len(res["granted"]) == len(locks) and res["lvb"]["seq"] == 0
            assert "continued" not in res and "continued" not in domain

    anyio.run(main)
