"""`minidisk serve` as a daemon: detaching, exit status, config file, halt, etfs."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests import harness
from tests.daemon.conftest import Server
from tests.harness import nbdinfo_json, run_cli


def _pid_alive(pid: int) -> bool:
    """Running, not a zombie: an exited server whose parent has not reaped it has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_detached_server_is_ready_when_serve_returns(short_tmp: Path) -> None:
    sock = short_tmp / "d.sock"
    done = run_cli("serve", "--memory", "disk=8M", f"unix://{sock}")
    assert done.returncode == 0, done.stderr
    try:
        # No waiting: the parent returned only once the child accepts connections.
        info = nbdinfo_json(f"nbd+unix:///disk?socket={sock}")
        assert info["exports"][0]["export-size"] == 8 << 20
    finally:
        assert run_cli("halt", f"unix://{sock}").returncode == 0
    assert not sock.exists()


def test_detach_reports_address_in_use(short_tmp: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        done = run_cli("serve", "--memory", "disk=8M", f"tcp://127.0.0.1:{port}/")
    finally:
        busy.close()
    assert done.returncode == 1
    assert "Address already in use" in done.stderr


@pytest.mark.parametrize("args, status, message", [  # 2: click's usage errors
    (["-d", "key=/a,hostpath=/tmp/x,size=1m,size=2m"], 1, "size"),
    (["-d", "key=/a,bogus=1"], 1, "bogus"),
    (["--memory", "disk"], 2, "KEY=SIZE"),
    (["--memory", "disk=12Q"], 2, "12Q"),
    (["--tls=require"], 2, "--tls-certificates"),
])
def test_bad_options_fail_with_one_line(short_tmp: Path, args: list[str], status: int,
                                        message: str) -> None:
    done = run_cli("serve", *args, f"unix://{short_tmp}/x.sock")
    assert done.returncode == status, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (short_tmp / "x.sock").exists()


def test_a_refused_table_names_its_file(short_tmp: Path) -> None:
    """`--table NAME=FILE`: the one line says which file held the table it refused."""
    table = short_tmp / "bad.table"
    table.write_text("0 64 linear /nowhere 0\n")
    done = run_cli("serve", "--memory", "a=1M", "--table", f"x={table}",
                   f"unix://{short_tmp}/t.sock")
    assert done.returncode == 1
    assert done.stderr == (f"minidisk serve: {table}: line 1 ('0 64 linear /nowhere 0'): "
                           "linear: Device lookup failed: /nowhere: key /nowhere is not "
                           "registered\n")
    assert not (short_tmp / "t.sock").exists()


def test_bad_url_is_refused(short_tmp: Path) -> None:
    done = run_cli("serve", "--memory", "d=1M", "http://example/")
    assert done.returncode == 2
    assert "unix://" in done.stderr


def test_halt_keeps_acknowledged_writes_and_removes_socket(short_tmp: Path) -> None:
    image = short_tmp / "disk.img"
    sock = short_tmp / "h.sock"
    done = run_cli("serve", "-d", f"key=/dk,hostpath={image},size=4m", f"unix://{sock}")
    assert done.returncode == 0, done.stderr
    pattern = os.urandom(1 << 20)
    src = short_tmp / "pattern"
    src.write_bytes(pattern)
    # blk type goes through the write-back cache: only halt's sync puts it in the file.
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -s {src} 1M 1M",
                    f"nbd+unix:///dk?socket={sock}"], check=True, capture_output=True)
    servers = [p for p in (int(x) for x in os.listdir("/proc") if x.isdigit())
               if _cmdline(p).endswith(f"unix://{sock}")]
    assert len(servers) == 1
    assert run_cli("halt", "--server", f"unix://{sock}").returncode == 0
    # halt returned only after the server synced and exited.
    assert not _pid_alive(servers[0])
    assert not sock.exists()
    assert image.read_bytes()[1 << 20:2 << 20] == pattern


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_sigterm_syncs_and_exits(serve: Server, short_tmp: Path) -> None:
    image = short_tmp / "t.img"
    sock = serve("-d", f"key=/dk,hostpath={image},size=1m")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x7e 0 64k",
                    f"nbd+unix:///dk?socket={sock}"], check=True, capture_output=True)
    server = next(p for p in (int(x) for x in os.listdir("/proc") if x.isdigit())
                  if _cmdline(p).endswith(f"unix://{sock}"))
    os.kill(server, 15)
    deadline = time.monotonic() + 10
    while _pid_alive(server) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert image.read_bytes()[:65536] == b"\x7e" * 65536
    assert not Path(sock).exists()


def test_config_file_says_what_flags_say(short_tmp: Path) -> None:
    image = short_tmp / "c.img"
    config = short_tmp / "server.toml"
    sock = short_tmp / "c.sock"
    config.write_text(f'''
url = "unix://{sock}"
memory = ["mem=2M"]
drive = ["key=/img,hostpath={image},size=1m,type=reg"]
read_only = true
''')
    done = run_cli("serve", "--config", str(config))
    assert done.returncode == 0, done.stderr
    try:
        names = sorted(e["export-name"] for e in nbdinfo_json(
            f"nbd+unix:///?socket={sock}")["exports"])
        info = nbdinfo_json(f"nbd+unix:///img?socket={sock}")["exports"][0]
        assert names == ["mem"]  # nbdinfo without --list shows the default export
        assert info["is_read_only"] is True and info["export-size"] == 1 << 20
    finally:
        run_cli("halt", f"unix://{sock}")


def test_config_file_errors_name_the_setting(short_tmp: Path) -> None:
    config = short_tmp / "bad.toml"
    config.write_text('memroy = ["x=1M"]\n')
    done = run_cli("serve", "--config", str(config), f"unix://{short_tmp}/b.sock")
    assert done.returncode == 2 and "memroy" in done.stderr


def test_etfs_register_ls_remove(serve: Server, short_tmp: Path) -> None:
    host = short_tmp / "host.img"
    host.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    sock = serve("--memory", "m=1M")
    env = {"MINIDISK_SERVER": f"unix://{sock}"}
    done = run_cli("etfs", "register", "--type", "reg", "--begin", "4096", "--size", "8192",
                   "/win", str(host), env=env)
    assert done.returncode == 0, done.stderr
    listing = run_cli("etfs", "ls", env=env).stdout
    assert "/win" in listing and "reg" in listing and "8192" in listing
    out = subprocess.run(["nbdcopy", f"nbd+unix:///win?socket={sock}", "-"],
                         capture_output=True, check=True).stdout
    assert out == host.read_bytes()[4096:4096 + 8192]
    assert run_cli("etfs", "remove", "/win", env=env).returncode == 0
    gone = run_cli("etfs", "remove", "/win", env=env)
    assert gone.returncode == 1 and "not registered" in gone.stderr
    past_end = run_cli("etfs", "register", "--type", "reg", "--begin", "20000", "/w2",
                       str(host), env=env)
    assert past_end.returncode == 1 and "/w2" not in run_cli("etfs", "ls", env=env).stdout


def test_etfs_remove_in_use_is_busy(serve: Server) -> None:
    sock = serve("--memory", "m=1M")
    env = {"MINIDISK_SERVER": f"unix://{sock}"}
    holder = subprocess.Popen(
        ["/usr/bin/python3", "-c",
         "import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); print('up', flush=True);"
         " sys.stdin.read()", f"nbd+unix:///m?socket={sock}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
        busy = run_cli("etfs", "remove", "/m", env=env)
        assert busy.returncode == 1 and "in use" in busy.stderr
        assert run_cli("etfs", "remove", "-f", "/m", env=env).returncode == 0
    finally:
        holder.kill()
        holder.wait()


def test_control_refused_for_other_uids(serve: Server) -> None:
    sock = serve("--memory", "m=1M")
    os.chmod(os.path.dirname(sock), 0o755)
    os.chmod(sock, 0o777)
    # Import while still root (the interpreter lives under /root), then become nobody.
    code = ("import os, sys; from minidisk import control_client;"
            "os.setgid(65534); os.setuid(65534);"
            "control_client.call(sys.argv[1], 'halt')")
    done = subprocess.run([os.environ.get("PYTHON", _venv_python()), "-c", code,
                           f"unix://{sock}"], capture_output=True, text=True)
    assert done.returncode == 1 and "refused control commands" in done.stderr
    assert Path(sock).exists()


def _venv_python() -> str:
    import sys

    return sys.executable


def test_serve_hosts_the_lock_manager(serve: Server, short_tmp: Path) -> None:
    dlm_sock = short_tmp / "dlm.sock"
    serve("--memory", "m=1M", "--dlm", f"unix://{dlm_sock}")
    assert dlm_sock.exists()
    # Two clients of the hosted DLM: an EX trylock held by one refuses the other.
    code = f"""
import anyio
from minidisk.dlm.client import connect
async def main():
    async with connect("unix://{dlm_sock}") as a, connect("unix://{dlm_sock}") as b:
        one = await a.initialize("dom")
        two = await b.initialize("dom")
        await one.lock("res", "EX", trylock=True)
        try:
            await two.lock("res", "EX", trylock=True)
        except OSError as e:
            print("refused", e.errno)
        await one.unlock("res")
anyio.run(main)
"""
    done = subprocess.run([_venv_python(), "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused"), done.stdout
    status = run_cli("dlm", "status", "--server", f"unix://{dlm_sock}")
    assert status.returncode == 0, status.stderr


def _server_pid(sock: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"unix://{sock}".encode() in cmdline and b"serve" in cmdline:
                return int(entry.name)
    raise LookupError(f"no server process for {sock}")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _runnable_seconds(pid: int) -> float:
    """Seconds the process's main thread (the server's event loop) spent on a CPU or waiting
    in the run queue for one (/proc/PID/schedstat)."""
    on_cpu, waiting, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return (int(on_cpu) + int(waiting)) / 1e9


@pytest.mark.parametrize("budget_us", [0, 10_000])
def test_busy_poll_spins_after_requests_then_sleeps(serve: Server, budget_us: int) -> None:
    """With --busy-poll-us the server keeps polling for the budget after each request and
    reply (here the largest, 10 ms, so that it shows), and stops when requests stop; without
    it, it sleeps between requests. The data is right either way. Asserts CPU wanted, not
    speed."""
    import asyncio

    from minidisk.nbd.client import RemoteDevice

    def during_requests(sock: str, measure: Callable[[int], float]) -> float:
        async def requests() -> None:
            dev = await RemoteDevice.connect(f"nbd+unix:///m?socket={sock}")
            try:
                for i in range(40):  # one request every 25 ms: the server would sleep between
                    data = bytes([i]) * 4096
                    await dev.pwrite(memoryview(data), i * 4096)
                    buf = bytearray(4096)
                    await dev.pread(memoryview(buf), i * 4096)
                    assert bytes(buf) == data
                    await asyncio.sleep(0.025)
            finally:
                await dev.close()

        pid = _server_pid(sock)
        before = measure(pid)
        asyncio.run(requests())
        return measure(pid) - before

    sock = serve("--memory", "m=1M", "--busy-poll-us", str(budget_us))
    pid = _server_pid(sock)
    if budget_us:
        # A poller yields the CPU between passes, so while other processes (a guest of
        # tests/vm) keep both CPUs busy it runs little; but it stays runnable, so the time it
        # wanted the CPU (on it or in the run queue) is at least its 80 budgets of 10 ms
        # whatever the load. A server that does not poll, asked the same in the same run,
        # wants only its wake-ups: the difference is the polling.
        polling = during_requests(sock, _runnable_seconds)
        sleeping = during_requests(serve("--memory", "m=1M"), _runnable_seconds)
        assert polling - sleeping > 0.3, \
            f"the server did not poll: runnable {polling:.2f} s, {sleeping:.2f} s without"
    else:
        during = during_requests(sock, _cpu_seconds)
        assert during < 0.15, f"the server spun without being asked: {during:.2f} s"
    time.sleep(0.2)  # the last budget runs out
    idle_start = _cpu_seconds(pid)
    time.sleep(1.0)
    idle = _cpu_seconds(pid) - idle_start
    assert idle < 0.1, f"the server kept spinning while idle: {idle:.2f} s of CPU in 1 s"


def test_busy_poll_setting_in_config_and_flags(short_tmp: Path) -> None:
    from minidisk.daemon.config import DaemonConfig

    url = f"unix://{short_tmp}/x.sock"
    toml = short_tmp / "poll.toml"
    toml.write_text(f'url = "{url}"\nbusy_poll_us = 50\n')
    assert DaemonConfig.load({}, str(toml)).busy_poll_us == 50
    assert DaemonConfig.load({"busy_poll_us": 0}, str(toml)).busy_poll_us == 0  # 0 wins too
    assert DaemonConfig.load({"url": (url,)}).busy_poll_us == 0  # off unless asked
    for bad in ("-1", "20000", "true", '"50"'):
        toml.write_text(f'url = "{url}"\nbusy_poll_us = {bad}\n')
        with pytest.raises(ValueError, match="busy_poll_us"):
            DaemonConfig.load({}, str(toml))
    done = run_cli("serve", "--busy-poll-us", "20000", "--memory", "m=1M", url)
    assert done.returncode == 2 and "--busy-poll-us" in done.stderr


def test_halt_with_a_dead_remote_still_syncs_the_rest_and_stops(serve: Server,
                                                                short_tmp: Path) -> None:
    """A remote export whose server died cannot be flushed. halt still flushes every other
    device (here a write-back blk cache registered after the remote), stops the server, and
    says what was not flushed (exit status 1)."""
    remote_sock = short_tmp / "remote.sock"
    remote = harness.start(["nbdkit", "-f", "-U", str(remote_sock), "memory", "16M"],
                           short_tmp / "remote.log", harness.accepting(remote_sock))
    try:
        sock = serve("--nbd", f"/remote=nbd+unix:///?socket={remote_sock}")
        pid = _server_pid(sock)
        host = short_tmp / "late.img"
        host.write_bytes(bytes(1 << 20))
        env = {"MINIDISK_SERVER": f"unix://{sock}"}
        done = run_cli("etfs", "register", "--type", "blk", "/late", str(host), env=env)
        assert done.returncode == 0, done.stderr
        pattern = bytes(range(256)) * 16
        subprocess.run(["nbdcopy", "-", f"nbd+unix:///late?socket={sock}"], input=pattern,
                       check=True, capture_output=True)
    finally:
        remote.kill()
    halted = run_cli("halt", f"unix://{sock}")
    assert halted.returncode == 1
    assert "server stopped, but not flushed: /remote:" in halted.stderr, halted.stderr
    assert not _pid_alive(pid)
    assert host.read_bytes()[:len(pattern)] == pattern  # the blk cache was written back
