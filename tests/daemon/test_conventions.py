"""The daemon conventions nbdkit and qemu-nbd users expect of `minidisk serve` (issue 18 item
3): --version, -f, --pid-file, --print-uri, --run (captive mode), --exit-with-parent, and a
`halt` that will not pull a disk from under a connected client unless forced."""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests import harness
from tests.harness import MINIDISK, SYSTEM_PYTHON, nbdinfo_json, run_cli, scaled

VERSION = importlib.metadata.version("minidisk")

# A libnbd client that opens URI (argv[1]), says "open" and holds the connection until its
# stdin closes.
HOLDER = """
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("open", flush=True)
sys.stdin.read()
h.shutdown()
"""


def _wait_for(check: object, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + scaled(seconds)
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_version_of_the_command_and_of_serve() -> None:
    for args in (["--version"], ["serve", "--version"]):
        done = run_cli(*args, check=True)
        assert done.stdout == f"minidisk {VERSION}\n"


def test_f_stays_in_the_foreground_as_nbdkit(short_tmp: Path) -> None:
    sock = short_tmp / "f.sock"
    server = harness.start([MINIDISK, "serve", "-f", "--memory", "d=1M", f"unix://{sock}"],
                           short_tmp / "f.log", harness.accepting(sock))
    try:
        assert server.alive()  # the process started is the server: nothing detached
        assert nbdinfo_json(f"nbd+unix:///d?socket={sock}")["exports"][0]["export-size"] \
            == 1 << 20
    finally:
        assert server.stop() == 0
    assert not sock.exists()


def test_pid_file_and_printed_uris_of_a_detached_server(short_tmp: Path) -> None:
    pid_file = short_tmp / "server.pid"
    done = run_cli("serve", "--memory", "a=1M", "--memory", "b=2M", "--print-uri",
                   "--pid-file", str(pid_file), "tcp://127.0.0.1:0/", f"unix://{short_tmp}/s.sock",
                   check=True)
    pid = int(pid_file.read_text())
    try:
        assert _alive(pid) and pid != os.getpid()
        uris = done.stdout.splitlines()
        assert len(uris) == 4 and uris[2:] == [f"nbd+unix:///a?socket={short_tmp}/s.sock",
                                               f"nbd+unix:///b?socket={short_tmp}/s.sock"]
        assert uris[0].startswith("nbd://127.0.0.1:") and uris[0].endswith("/a")
        assert not uris[0].startswith("nbd://127.0.0.1:0/")  # the port the kernel chose
        sizes = [nbdinfo_json(uri)["exports"][0]["export-size"] for uri in uris]
        assert sizes == [1 << 20, 2 << 20, 1 << 20, 2 << 20]
    finally:
        run_cli("halt", f"unix://{short_tmp}/s.sock", check=True)
    assert not _alive(pid)
    assert not pid_file.exists()


def test_run_serves_while_the_command_runs_and_exits_with_its_status(short_tmp: Path) -> None:
    script = ('nbdinfo --size "$uri" > sizes; test "$sock" = "$unixsocket" || exit 90; '
              'test "$exportname" = d || exit 91; echo "$sock" > sock; exit 7')
    done = subprocess.run([MINIDISK, "serve", "--memory", "d=3M", "--run", script],
                          cwd=short_tmp, capture_output=True, text=True, timeout=scaled(120))
    assert done.returncode == 7, done.stderr
    assert (short_tmp / "sizes").read_text() == f"{3 << 20}\n"
    sock = Path((short_tmp / "sock").read_text().strip())
    assert sock.name == "nbd.sock"
    assert not sock.parent.exists()  # the private socket directory went with the server


def test_run_with_a_url_and_a_command_killed_by_a_signal(short_tmp: Path) -> None:
    sock = short_tmp / "r.sock"
    done = subprocess.run([MINIDISK, "serve", "--memory", "d=1M", "--run",
                           'test "$uri" = "nbd+unix:///d?socket=' + str(sock) + '" && kill -9 $$',
                           f"unix://{sock}"], capture_output=True, text=True,
                          timeout=scaled(120))
    assert done.returncode == 128 + 9, done.stderr
    assert not sock.exists()


def test_run_refuses_stdio() -> None:
    done = run_cli("serve", "--memory", "d=1M", "--run", "true", "-")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "minidisk: --run and - (stdio): the command needs a socket to connect to; give "
        "unix://PATH or tcp://IP:PORT/ (or no URL: a private socket)"]


def test_exit_with_parent(short_tmp: Path) -> None:
    """The parent starts the server and exits: the server stops, as a SIGTERM stops it."""
    pid_file = short_tmp / "s.pid"
    parent = subprocess.Popen([
        sys.executable, "-c",
        "import subprocess, sys, time, pathlib\n"
        f"subprocess.Popen([{MINIDISK!r}, 'serve', '--exit-with-parent', '--memory', 'd=1M',"
        f" '-P', {str(pid_file)!r}, 'unix://{short_tmp}/s.sock'])\n"
        f"while not pathlib.Path({str(pid_file)!r}).exists(): time.sleep(0.02)\n"
        "sys.stdin.read()\n"], stdin=subprocess.PIPE)
    try:
        _wait_for(pid_file.exists, "the server's pid file")
        pid = int(pid_file.read_text())
        assert _alive(pid)
        assert parent.stdin is not None
        parent.stdin.close()  # the parent exits
        assert parent.wait(scaled(30)) == 0
        _wait_for(lambda: not _alive(pid), "the server to exit with its parent")
    finally:
        harness.stop_process(parent)
    assert not pid_file.exists() and not (short_tmp / "s.sock").exists()


def test_halt_refuses_while_a_client_is_connected_and_force_stops(short_tmp: Path) -> None:
    server = harness.serve(short_tmp, "--memory", "disk=1M")
    url = server.url
    holder = subprocess.Popen([SYSTEM_PYTHON, "-c", HOLDER, server.uri("disk")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        listing = run_cli("clients", url, check=True).stdout.splitlines()
        assert listing[0].split() == ["PEER", "EXPORT", "MODE", "SINCE", "IN-FLIGHT"]
        assert len(listing) == 2 and f"pid {holder.pid} (uid {os.getuid()})" in listing[1]
        assert listing[1].split()[4:6] == ["disk", "rw"]
        refused = run_cli("halt", url)
        assert refused.returncode == 1
        assert refused.stderr.splitlines() == [
            f"minidisk: 1 client(s) connected (pid {holder.pid} (uid {os.getuid()}) on disk): "
            "`halt --force` stops the server anyway"]
        assert server.alive()
        assert run_cli("halt", "--force", url).returncode == 0
        assert server.proc.wait(scaled(30)) == 0
    finally:
        harness.stop_process(holder)
        server.stop()


def test_ready_is_told_to_systemd(short_tmp: Path) -> None:
    """Type=notify: READY=1 on $NOTIFY_SOCKET once the server accepts connections."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_tmp / "notify"))
    notify.settimeout(scaled(60))
    sock = short_tmp / "n.sock"
    server = subprocess.Popen([MINIDISK, "serve", "-f", "--memory", "d=1M", f"unix://{sock}"],
                              env={**os.environ, "NOTIFY_SOCKET": str(short_tmp / "notify")})
    try:
        message = notify.recv(4096).decode()
        assert message == f"READY=1\nMAINPID={server.pid}"
        assert harness.accepts(sock)  # ready means ready
    finally:
        harness.stop_process(server)
        notify.close()


def test_shipped_units_pass_systemd_analyze_verify(short_tmp: Path) -> None:
    units = short_tmp / "units"
    units.mkdir()
    written = run_cli("units", "--install", str(units), check=True).stdout.split()
    assert sorted(written) == sorted(str(units / name) for name in
                                     ("minidisk@.service", "minidisk@.socket",
                                      "minidisk-dlm.service", "minidisk-automount.service"))
    service = (units / "minidisk@.service").read_text()
    assert f"ExecStart={MINIDISK} serve -f --config /etc/minidisk/%i.toml\n" in service
    # A template is verified as an instance of itself.
    for template in ("minidisk@.service", "minidisk@.socket"):
        instance = units / template.replace("@.", "@test.")
        instance.write_text((units / template).read_text())
    names = ["minidisk@test.service", "minidisk@test.socket", "minidisk-dlm.service",
             "minidisk-automount.service"]
    verify = subprocess.run(["systemd-analyze", "verify", *(str(units / n) for n in names)],
                            capture_output=True, text=True, timeout=scaled(60))
    assert verify.returncode == 0 and not verify.stderr, verify.stderr


def test_a_detached_server_without_a_log_file_logs_to_syslog(short_tmp: Path) -> None:
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(str(short_tmp / "log"))
    syslog.settimeout(scaled(60))
    sock = short_tmp / "d.sock"
    try:
        run_cli("serve", "-v", "--memory", "d=1M", f"unix://{sock}",
                env={"MINIDISK_SYSLOG_SOCKET": str(short_tmp / "log")}, check=True)
        # <30>: facility daemon (3 << 3), priority info (6).
        lines: list[str] = []
        while not any("serving d on" in line for line in lines):
            lines.append(syslog.recv(4096).decode())
        assert re.fullmatch(r"<30>minidisk\[\d+\]: INFO minidisk\.daemon\.daemon: serving d "
                            rf"on unix://{sock}\x00?", lines[-1])
    finally:
        run_cli("halt", f"unix://{sock}")
        syslog.close()


def test_log_lines_have_a_time_unless_journald_reads_them(short_tmp: Path) -> None:
    for env, stamped in (({}, True), ({"JOURNAL_STREAM": "8:1234"}, False)):
        sock = short_tmp / "t.sock"
        server = harness.start([MINIDISK, "serve", "-f", "-v", "--memory", "d=1M",
                                f"unix://{sock}"], short_tmp / "t.log", harness.accepting(sock),
                               env={**os.environ, **env})
        server.stop()
        line = next(line for line in server.log_text().splitlines() if "serving d" in line)
        assert bool(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} minidisk\[", line)) \
            == stamped, line
        assert re.search(r"minidisk\[\d+\] INFO minidisk\.daemon\.daemon: serving d on", line)
