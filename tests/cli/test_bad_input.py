"""Bad input to the CLI: one line naming the path or value and what to do, non-zero exit,
no traceback (issue 18 item 4). Each case runs the real command as a subprocess."""

from __future__ import annotations

import subprocess
import sys
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
