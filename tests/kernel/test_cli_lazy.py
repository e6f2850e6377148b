"""The `minidisk` command imports only the module of the command it runs: `detach` and `--help`
must stay cheap (in a TCG guest every module costs ~30 ms; the whole CLI took 10 s there)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import click
import pytest

from minidisk.cli import main

pytestmark = pytest.mark.timeout(60)

# The server, the lock manager and the linker: what `detach` used to import through the others.
HEAVY = ("asyncio", "ssl", "ctypes", "minidisk.nbd.server", "minidisk.dlm", "minidisk.link",
         "minidisk.cli.serve", "minidisk.cli.dmsetup")


def modules_after(*argv: str) -> set[str]:
    """The modules loaded by `minidisk ARGV…` in a fresh interpreter."""
    code = ("import json, sys\n"
            "from minidisk.cli.main import main\n"
            f"sys.argv = ['minidisk', *{list(argv)!r}]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=True)
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [("--help",), ("detach", "--help"), ("attach", "--help")])
def test_cheap_commands_import_no_server(argv: tuple[str, ...]) -> None:
    loaded = modules_after(*argv)
    assert sorted(m for m in loaded if m in HEAVY) == []


def test_help_lists_every_command_with_its_own_line() -> None:
    """The table `--help` prints from is the commands' own first sentences, all of them."""
    eager = click.Group()
    for module in {module for module, _ in main.COMMANDS.values()}:
        importlib.import_module(f"minidisk.cli.{module}").register(eager)
    assert sorted(eager.commands) == sorted(main.COMMANDS)
    for name, command in eager.commands.items():
        assert main.COMMANDS[name][1] == command.get_short_help_str(limit=1000), name


def test_lazy_group_runs_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "minidisk", "detach", "/dev/no-such-dev"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: /dev/no-such-dev: no such device"
    unknown = subprocess.run([sys.executable, "-m", "minidisk", "no-such-command"],
                             capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 2 and "No such command 'no-such-command'" in unknown.stderr


BACKENDS = ("minidisk.kernel.nbdkernel", "minidisk.kernel.fuseloop", "minidisk.kernel.persist",
            "minidisk.kernel.handshake", "minidisk.nbd.client_negotiation")


@pytest.mark.parametrize("argv", [("attach", "--help"), ("detach", "--help"),
                                  ("detach", "/dev/no-such-device")])
def test_attach_help_and_a_failing_detach_import_no_backend(argv: tuple[str, ...]) -> None:
    """The backends are imported when a device is attached or detached, not to print help or
    to refuse a device that is not there (nor does detach ever need the handshake)."""
    loaded = modules_after(*argv)
    assert sorted(m for m in loaded if m in BACKENDS) == []
