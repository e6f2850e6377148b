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
    # Passed before too (xfstests' own message, kept for the drop-in), kept as a guard.
    (["replay-log", "--log", f"{MISSING}/log.img"], f"{MISSING}/log.img"),
]


@pytest.mark.parametrize(("args", "named"), CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_one_line_naming_the_value(tmp_path: Path, args: list[str], named: str) -> None:
    if args[0] == "setpriv":  # run as nobody: the interpreter after setpriv's own options
        command = [*args[:4], sys.executable, *args[4:]]
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


def test_halt_of_a_tls_server_says_how(short_tmp: Path) -> None:
    from tests.pki import Authority

    Authority().issue(short_tmp / "pki", "localhost", "server")
    sock = short_tmp / "t.sock"
    server = subprocess.Popen([sys.executable, "-m", "minidisk", "serve", "-s", "--memory",
                               "d=1M", "--tls", "require", "--tls-certificates",
                               str(short_tmp / "pki"), f"unix://{sock}"])
    try:
        for _ in range(300):  # up to 15 s for the server to listen
            if sock.exists() or server.poll() is not None:
                break
            time.sleep(0.05)
        assert sock.exists(), "the TLS server did not start"
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
