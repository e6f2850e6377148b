"""Bad input to the CLI: one line naming the path or value and what to do, non-zero exit,
no traceback (issue 18 item 4). Each case runs the real command as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

MISSING = "/nonexistent-minidisk-test"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "-m", "minidisk"]
# Where the nbd driver is loaded the attach goes on to connect, and fails naming the socket.
NBD_LOADED = os.path.exists("/sys/module/nbd")

CASES = [
    (["serve", "-s", "--table", f"t={MISSING}/x.table", "unix://a.sock"], f"{MISSING}/x.table"),
    (["serve", "-s", "--file", f"d={MISSING}/img", "unix://a.sock"], f"{MISSING}/img"),
    (["serve", "--memory", "d=1M", "--log-file", f"{MISSING}/log", "unix://a.sock"],
     f"{MISSING}/log"),
    (["serve", "-s", "--memory", "d=1M", "--directory", f"{MISSING}/db.sqlite", "unix://a.sock"],
     f"{MISSING}/db.sqlite"),
    (["serve", "-s", "--memory", "d=12q", "unix://a.sock"], "12q"),
    (["quickstart", "--size", "12q", "--once"], "12q"),
    (["serve", "-s", "--memory", "d=1M", "--tls", "require", "--tls-certificates", ".",
      "unix://a.sock"], "ca-cert.pem"),
    (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "-m", "minidisk",
      "attach", "nbd+unix:///d?socket=/tmp/none.sock"], "needs root"),
    (["dlmfs", ".", "--server", f"unix://{MISSING}/dlm.sock"],
     f"no lock manager at unix://{MISSING}/dlm.sock (No such file or directory): start "
     "`minidisk dlm serve`"),
    (["dlm", "status", "--server", f"unix://{MISSING}/dlm.sock"],
     f"no lock manager at unix://{MISSING}/dlm.sock"),
    (["attach", "--method", "netlink", "nbd+unix:///d?socket=/tmp/none.sock"],
     "/tmp/none.sock" if NBD_LOADED else "modprobe nbd"),
    (["attach", "--method", "ioctl", "nbd+unix:///d?socket=/tmp/none.sock"],
     "/tmp/none.sock" if NBD_LOADED else "modprobe nbd"),
    (["directory", "--directory", f"{MISSING}/d.sqlite", "ls"],
     f"directory {MISSING}/d.sqlite: no such file"),
    (["directory", "--directory", "d.sqlite", "ls"], "directory d.sqlite: no such file"),
    (["directory", "--directory", f"{MISSING}/d.sqlite", "grant", "alice.0191", "bob"],
     f"directory {MISSING}/d.sqlite: no such file"),
    (["serve", "-s", "--memory", "d=1M", "--read-only", "--read-write", "unix://a.sock"],
     "--read-only and --read-write"),
    # Passed before too (xfstests' own message, kept for the drop-in), kept as a guard.
    (["replay-log", "--log", f"{MISSING}/log.img"], f"{MISSING}/log.img"),
]


@pytest.mark.parametrize(("args", "named"), CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_one_line_naming_the_value(tmp_path: Path, args: list[str], named: str) -> None:
    if args[0] == "setpriv":  # run as nobody: the interpreter after setpriv's own options
        command = [*args[:4], sys.executable, *args[4:]]
    elif args[0] == "attach":  # as root: the check for root comes first
        command = [sys.executable, "-m", "minidisk", *args]
    else:
        command = [sys.executable, "-m", "minidisk", *args]
    tmp_path.chmod(0o755)
    run = subprocess.run(command, cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert named in lines[0] and "Traceback" not in run.stderr
    assert not Path(MISSING).exists()  # nothing was created on the way
    assert not list(tmp_path.iterdir())


def _wait_for_socket(sock: Path, server: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    for _ in range(300):  # up to 15 s for the server to listen
        if sock.exists() or server.poll() is not None:
            break
        time.sleep(0.05)
    assert sock.exists(), f"the server did not start (status {server.poll()})"


def test_halt_of_a_tls_server_says_how(short_tmp: Path) -> None:
    from tests.pki import Authority

    Authority().issue(short_tmp / "pki", "localhost", "server")
    sock = short_tmp / "t.sock"
    server = subprocess.Popen([sys.executable, "-m", "minidisk", "serve", "-s", "--memory",
                               "d=1M", "--tls", "require", "--tls-certificates",
                               str(short_tmp / "pki"), f"unix://{sock}"])
    try:
        _wait_for_socket(sock, server)
        env = {k: v for k, v in os.environ.items() if k != "MINIDISK_TLS_CERTIFICATES"}
        run = subprocess.run([sys.executable, "-m", "minidisk", "halt", f"unix://{sock}"],
                             capture_output=True, text=True, timeout=30, env=env)
        assert run.returncode == 1
        assert run.stderr.splitlines() == [
            f"minidisk: unix://{sock} needs TLS: set MINIDISK_TLS_CERTIFICATES=DIR "
            "(ca-cert.pem, client-cert.pem, client-key.pem)"]
    finally:
        server.terminate()
        server.wait(10)


def _nobody_serves(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*NOBODY[:4], sys.executable, *NOBODY[4:], "serve", "-s", *args],
                            cwd=cwd, stderr=subprocess.PIPE, text=True)


def test_a_file_this_user_may_not_write_is_served_read_only(short_tmp: Path) -> None:
    """nbdkit's file plugin serves a read-only file read-only; so does --file, saying so."""
    short_tmp.chmod(0o755)
    image = short_tmp / "ro.img"
    image.write_bytes(b"\xab" * 65536)
    image.chmod(0o444)
    run_dir = short_tmp / "run"
    run_dir.mkdir()
    os.chown(run_dir, 65534, 65534)
    sock = run_dir / "s.sock"
    server = _nobody_serves(["--file", f"d={image}", f"unix://{sock}"], short_tmp)
    try:
        _wait_for_socket(sock, server)
        info = subprocess.run(["nbdinfo", "--json", f"nbd+unix:///d?socket={sock}"],
                              capture_output=True, text=True, timeout=30, check=True)
        assert '"is_read_only": true' in info.stdout
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=10)
    assert stderr.splitlines()[0] == (f"minidisk: warning: --file /d={image}: not writable by "
                                      "this user: serving it read-only")


def test_read_write_refuses_a_file_this_user_may_not_write(short_tmp: Path) -> None:
    short_tmp.chmod(0o755)
    image = short_tmp / "ro.img"
    image.write_bytes(bytes(4096))
    image.chmod(0o444)
    server = _nobody_serves(["--read-write", "--file", f"d={image}",
                             f"unix://{short_tmp}/s.sock"], short_tmp)
    _, stderr = server.communicate(timeout=30)
    assert server.returncode == 2
    assert stderr.splitlines() == [f"minidisk: --file /d={image}: not writable by this user: "
                                   "--read-write refuses to serve it read-only"]
    assert image.read_bytes() == bytes(4096)
