"""`minidisk man`: a page per command, made from the commands themselves, clean under groff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
from tests.harness import ROOT, run_cli

from minidisk.cli.main import COMMANDS, cli
from minidisk.cli.manpages import pages


def test_every_command_has_a_page_groff_takes_without_a_warning() -> None:
    made = pages()
    assert set(made) == {"minidisk.1", *(f"minidisk-{name}.1" for name in COMMANDS)}
    for name, text in made.items():
        lint = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=text,
                              capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0 and not lint.stderr, f"{name}: {lint.stderr}"


def test_a_page_has_every_option_of_its_command() -> None:
    root = click.Context(cli, info_name="minidisk")
    serve = cli.get_command(root, "serve")
    assert serve is not None
    shown = subprocess.run(["man", "-l", "-"], input=pages()["minidisk-serve.1"],
                           capture_output=True, text=True, timeout=60,
                           env={"MANWIDTH": "200", "PATH": "/usr/bin:/bin"}).stdout
    assert "minidisk-serve - Serve block devices over NBD" in shown
    for param in serve.params:
        for option in param.opts:
            if option.startswith("-"):
                assert option in shown, option
    # A group's page has a section per subcommand, with its options.
    dlm = subprocess.run(["man", "-l", "-"], input=pages()["minidisk-dlm.1"],
                         capture_output=True, text=True, timeout=60,
                         env={"MANWIDTH": "200", "PATH": "/usr/bin:/bin"}).stdout
    assert "serve [OPTIONS] [URL]" in dlm and "--max-clients" in dlm


def test_install_writes_man1_and_a_bad_command_is_one_line(tmp_path: Path) -> None:
    written = run_cli("man", "--install", str(tmp_path), check=True).stdout.split()
    assert sorted(written) == sorted(str(tmp_path / "man1" / name) for name in pages())
    assert (tmp_path / "man1" / "minidisk-attach.1").read_text() == pages()["minidisk-attach.1"]
    bad = run_cli("man", "nosuch")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == ["minidisk: no command 'nosuch': see `minidisk --help`"]


def _complete(words: str, shell: str = "bash") -> list[str]:
    done = run_cli(env={"COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1),
                        "_MINIDISK_COMPLETE": f"{shell}_complete"}, check=True)
    return [line.split(",", 1)[1] for line in done.stdout.splitlines()]


def test_shell_completion_as_the_readme_documents_it() -> None:
    script = run_cli(env={"_MINIDISK_COMPLETE": "bash_source"}, check=True).stdout
    assert "complete -o nosort -F _minidisk_completion minidisk" in script
    assert _complete("minidisk se") == ["serve"]
    assert _complete("minidisk serve --pid") == ["--pid-file"]
    assert _complete("minidisk dlm s") == ["serve", "status"]


def test_the_python_api_reference_is_what_the_code_says() -> None:
    """docs/api.md is generated from the signatures and docstrings; a change to either
    without regenerating it fails here."""
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_reference.py"),
                            "--check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    reference = (ROOT / "docs" / "api.md").read_text()
    for name in ("serve_object", "from_object", "BlockDevice.pwrite", "connect(",
                 "Lock.acquire", "class `Mode`"):
        assert name in reference, name
