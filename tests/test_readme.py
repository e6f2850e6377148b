"""Every shell and Python block of README.md runs, and shows what it says (issue 18 item 7).

A README drifts from the code silently: a socket path that moved, a window past the end of
its file, a top-level `async with` that no script can run. tests/readme_blocks.py extracts
the blocks (its docstring is the grammar of fences and directives); each chain of blocks runs
here, as root, in a mount and PID namespace of its own with fresh /tmp, /srv, /mnt,
/run/minidisk, ... so that the README's absolute paths are safe to use as they are. After
the last block, everything the chain left running gets SIGTERM (a server halts, an
automounter unmounts), then SIGKILL, and whatever is still attached is detached.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from tests.harness import ROOT, VENV_BIN, need_root, scaled
from tests.readme_blocks import (
    FRESH_DIRECTORIES,
    USERS,
    Chain,
    Expectation,
    ReadmeError,
    chains,
    named_directories,
    parse,
    shell_script,
)

README = ROOT / "README.md"
BLOCKS = parse(README.read_text())
CHAINS = chains(BLOCKS)
CHAIN_TIMEOUT = 300.0  # seconds for one chain (scaled), teardown included
TEARDOWN = 30  # seconds the chain's processes get between SIGTERM and SIGKILL


def _params() -> list[object]:
    return [pytest.param(chain, id=chain.name,
                         marks=[pytest.mark.autofs] if chain.autofs else [])
            for chain in CHAINS]


# Runs inside the namespaces as their PID 1: fresh directories and users, each block in turn,
# then the teardown. `exec 3>` keeps bash's own trace of which block runs on stderr.
OUTER = r"""
set -eu
{keep}
for d in {fresh}; do
    if [ -d "$d" ]; then mount -t tmpfs -o mode=0755 readme "$d"; fi
done
chmod 1777 /tmp
{restore}
mount --bind {base}/passwd /etc/passwd
mount --bind {base}/group /etc/group
others() {{  # builtins only: a process of its own would count itself
    for p in /proc/[0-9]*; do [ "${{p#/proc/}}" != 1 ] && return 0; done
    return 1
}}
teardown() {{
    kill -TERM -1 2>/dev/null || true
    for _ in $(seq {teardown}0); do
        others || break
        sleep 0.1
    done
    kill -KILL -1 2>/dev/null || true
    for dev in $(minidisk attach --list 2>/dev/null | awk 'NR > 1 {{print $1}}'); do
        minidisk detach "$dev" >&2 || true
    done
}}
trap teardown EXIT
cd {work}
{steps}
"""


def _step(chain: Chain, index: int, base: Path) -> str:
    block = chain.blocks[index]
    where = f"echo '==> README.md:{block.line}' >&2"
    if block.file is not None:
        return f"{where}; cp {shlex.quote(str(base / f'{block.line}.txt'))} {block.file}"
    program = "python3" if block.language == "python" else "bash"
    script = shlex.quote(str(base / f"{block.line}.{'py' if program == 'python3' else 'sh'}"))
    if block.user is None:
        return f"{where}; {program} {script}"
    uid = USERS[block.user]
    return (f"{where}; setpriv --reuid={uid} --regid={uid} --clear-groups "
            f"env -u XDG_RUNTIME_DIR USER={block.user} LOGNAME={block.user} HOME=/tmp "
            f"{program} {script}")


def _kept(base: Path) -> tuple[str, str]:
    """Shell lines that keep the checkout and the interpreter reachable in the namespace.

    The checkout (and its .venv) may lie below a directory the chain gets fresh (a clone in
    /tmp): it is bind-mounted aside first and back into the fresh tmpfs after. The venv's
    interpreter may lie below a directory other users cannot enter (pyenv's in /root, 0700):
    for the README's users that directory is covered by a tmpfs of mode 0755 holding only
    the interpreter's tree.
    """
    keep: list[str] = []
    restore: list[str] = []

    def move(path: Path) -> None:
        aside = base / f"keep{len(keep)}"
        # --rbind: the guest mounts the venv and the interpreter below the checkout
        keep.append(f"mkdir -p {aside} && mount --rbind {shlex.quote(str(path))} {aside}")
        restore.append(f"mkdir -p {shlex.quote(str(path))} && "
                       f"mount --rbind {aside} {shlex.quote(str(path))}")

    if any(ROOT.is_relative_to(d) for d in FRESH_DIRECTORIES):
        move(ROOT)
    interpreter = (VENV_BIN / "python3").resolve()
    for closed in reversed(interpreter.parents):
        if closed != Path("/") and not closed.stat().st_mode & 0o001:
            move(interpreter.parents[len(interpreter.relative_to(closed).parts) - 2])
            keep.append(f"mount -t tmpfs -o mode=0755 readme {shlex.quote(str(closed))}")
            break
    return "\n".join(keep), "\n".join(restore)


def _users(base: Path) -> None:
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    for name, uid in USERS.items():
        passwd += f"{name}:x:{uid}:{uid}:README user:/tmp:/bin/sh\n"
        group += f"{name}:x:{uid}:\n"
    (base / "passwd").write_text(passwd)
    (base / "group").write_text(group)


def run_chain(chain: Chain) -> tuple[subprocess.CompletedProcess[str], list[Expectation],
                                     Path]:
    base = Path(tempfile.mkdtemp(prefix="readme-", dir="/var/tmp"))  # not below /tmp
    base.chmod(0o755)
    (base / "work").mkdir(mode=0o1777)
    (base / "work").chmod(0o1777)
    outputs = base / "out"
    outputs.mkdir()
    outputs.chmod(0o1777)
    _users(base)
    expected: list[Expectation] = []
    for block in chain.blocks:
        if block.file is not None:
            (base / f"{block.line}.txt").write_text(block.text)
        elif block.language == "python":
            (base / f"{block.line}.py").write_text(block.text)
        else:
            script, wanted = shell_script(block, outputs)
            (base / f"{block.line}.sh").write_text(script)
            expected += wanted
    steps = "\n".join(_step(chain, i, base) for i in range(len(chain.blocks)))
    keep, restore = _kept(base)
    (base / "outer.sh").write_text(OUTER.format(
        keep=keep, restore=restore,
        fresh=" ".join(FRESH_DIRECTORIES), base=shlex.quote(str(base)),
        work=shlex.quote(str(base / "work")), teardown=TEARDOWN, steps=steps))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MINIDISK_") or key == "MINIDISK_TEST_TIME_SCALE"}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    made = _mount_points(chain)
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
             "--propagation", "private", "bash", str(base / "outer.sh")],
            capture_output=True, text=True, env=env, timeout=scaled(CHAIN_TIMEOUT))
    finally:
        for directory in made:
            directory.rmdir()
    return done, expected, base


def _mount_points(chain: Chain) -> list[Path]:
    """The fresh directories this machine lacks and the chain names, made so that the chain
    gets a tmpfs there (and removed by the caller afterwards; each is named by one chain
    only, so no other chain's mount is below it meanwhile). /run/minidisk, minidisk's own
    runtime directory on a tmpfs, is made and kept: every attach uses it, named or not."""
    named = named_directories("".join(block.text for block in chain.blocks))
    made = []
    for name in FRESH_DIRECTORIES:
        directory = Path(name)
        if directory.exists():
            continue
        if name == "/run/minidisk":
            directory.mkdir(mode=0o755)
        elif name in named:
            directory.mkdir(mode=0o755)
            made.append(directory)
    return made


def test_a_directory_is_named_as_a_path_only() -> None:
    """A chain gets a fresh /dlm only where it uses /dlm: not for the dlm.sock below
    /run/minidisk (a guest, whose root is read-only, cannot make one)."""
    assert named_directories('dlm = "unix:///run/minidisk/dlm.sock"') == ["/run/minidisk"]
    assert named_directories("mount /dlm/x; ls '/vmlink'") == ["/dlm", "/vmlink"]
    assert named_directories("/srvx /mnt.d x/etc/minidisk") == []


def test_every_fence_says_whether_it_runs() -> None:
    """An unlabelled fence (or a misspelt directive) fails here instead of going unrun."""
    assert CHAINS, "no runnable block found in README.md"
    with pytest.raises(ReadmeError, match="README.md:3: fence"):
        parse("text\n\n```\necho hi\n```\n")
    with pytest.raises(ReadmeError, match="directive 'as=mallory'"):
        parse("<!-- readme-test: as=mallory -->\n```sh\nid\n```\n")


def test_a_wrong_output_or_a_failing_line_fails_the_chain() -> None:
    """The runner's own check: a `$` line whose output differs, and a plain line that fails,
    are both caught (each would pass unnoticed if the runner ignored them)."""
    need_root()
    wrong = parse("```sh\n$ echo hello\nhullo\n```\n")
    done, expected, base = run_chain(chains(wrong)[0])
    try:
        assert done.returncode == 0, done.stderr
        assert _mismatches(expected) == ["$ echo hello\n--- README\nhullo\n--- ran\nhello"]
    finally:
        shutil.rmtree(base)
    failing = parse("```sh\ntrue\nfalse\necho never\n```\n")
    done, _, base = run_chain(chains(failing)[0])
    shutil.rmtree(base)
    assert done.returncode != 0 and "never" not in done.stdout


def test_the_two_commands() -> None:
    """The README's set-up block. Its second command is the one CI runs (.ci/run execs it:
    this suite is its run); its first runs here as written, from the checkout, until the
    quickstart asks for Ctrl-C, which it then gets: it must tear down and exit 0."""
    (block,) = [b for b in BLOCKS if b.by == "test_the_two_commands"]
    commands = [line.split("#")[0].strip() for line in block.text.splitlines()]
    assert commands == ["./scripts/quickstart.sh", "./scripts/test.sh"]
    assert "exec ./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    need_root()
    proc = subprocess.Popen(["./scripts/quickstart.sh"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    output: list[str] = []
    prompted = threading.Event()

    def read() -> None:  # a thread: readline blocks, and the pipe's buffer hides from select
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if "Ctrl-C" in line:
                prompted.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    prompted.wait(scaled(240))
    try:
        assert any("Ctrl-C" in line for line in output), "".join(output)
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: the whole foreground group
        proc.wait(timeout=scaled(120))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    report = "".join(output)
    assert proc.returncode == 0, report
    assert "done: nothing is left mounted, attached or listening" in output[-1], report


def _mismatches(expected: list[Expectation]) -> list[str]:
    wrong = []
    for want in expected:
        path = want.output_path
        got = path.read_text().rstrip("\n") if path.exists() else "(not run)"
        # Trailing blanks are compared away: the kernel's thin-pool status ends in one, and
        # no editor keeps them in a README.
        got = "\n".join(line.rstrip() for line in got.split("\n"))
        if got != want.output:
            wrong.append(f"$ {want.command}\n--- README\n{want.output}\n--- ran\n{got}")
    return wrong


@pytest.mark.timeout(scaled(CHAIN_TIMEOUT) + 60)
@pytest.mark.parametrize("chain", _params())
def test_readme_block_runs_as_written(chain: Chain) -> None:
    need_root()
    done, expected, base = run_chain(chain)
    try:
        report = f"stdout:\n{done.stdout[-6000:]}\nstderr:\n{done.stderr[-6000:]}"
        assert done.returncode == 0, report
        wrong = _mismatches(expected)
        assert not wrong, "\n\n".join(wrong) + "\n\n" + report
    finally:
        shutil.rmtree(base, ignore_errors=True)
