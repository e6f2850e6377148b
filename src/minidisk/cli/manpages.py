"""`minidisk man`: a manual page per command, made from the commands' own definitions.

The pages are generated from click's command objects (usage, help text, each option's help
record), so they cannot drift from `--help`: minidisk(1) lists the commands, minidisk-CMD(1)
describes one, a group (dlm, directory, dmsetup, etfs) with a section per subcommand.
`minidisk man --install DIR` writes them as DIR/man1/*.1 (e.g. /usr/local/share/man), where
`man minidisk-serve` finds them.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import click

from minidisk.cli.common import fail


def _roff(text: str) -> str:
    """`text` as troff input: backslashes and hyphens escaped, characters beyond ASCII by
    their code point, break points after the commas and bars of long option syntax, and no
    line taken for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = text.replace(",", ",\\:").replace("|", "|\\:")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    out = []
    for line in text.splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _options(command: click.Command, ctx: click.Context) -> list[str]:
    lines = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        lines += [".TP", f".B {_roff(names)}", _roff(help_text) or "\\&"]
    return lines


def _usage(command: click.Command, ctx: click.Context) -> str:
    return " ".join(command.collect_usage_pieces(ctx))


def page(path: list[str], command: click.Command, parent: click.Context) -> str:
    """The manual page of `command`, reached as `minidisk PATH...`."""
    name = "-".join(["minidisk", *path])
    ctx = click.Context(command, info_name=path[-1], parent=parent) if path else parent
    version = importlib.metadata.version("minidisk")
    # Left-adjusted, unhyphenated: option names and URLs are long words that justification
    # cannot stretch a line around.
    lines = [f'.TH {name.upper()} 1 "" "minidisk {version}" "minidisk manual"', ".ad l", ".nh",
             ".SH NAME", f"{_roff(name)} \\- {_roff(command.get_short_help_str(200))}",
             ".SH SYNOPSIS", f".B {_roff(ctx.command_path)}", _roff(_usage(command, ctx)),
             ".SH DESCRIPTION"]
    for paragraph in (command.help or "").strip().split("\n\n"):
        lines += [_roff(" ".join(paragraph.split())), ".PP"]
    lines.pop()
    options = _options(command, ctx)
    if options:
        lines += [".SH OPTIONS", *options]
    if not path:  # minidisk(1): each command in a line, its page named
        from minidisk.cli.main import COMMANDS

        lines.append(".SH COMMANDS")
        for sub_name, (_, summary) in sorted(COMMANDS.items()):
            lines += [".TP", f".BR minidisk\\-{_roff(sub_name)} (1)", _roff(summary)]
    elif isinstance(command, click.Group):
        lines.append(".SH COMMANDS")
        for sub_name in command.list_commands(ctx):
            sub = command.get_command(ctx, sub_name)
            if sub is None:
                continue
            sub_ctx = click.Context(sub, info_name=sub_name, parent=ctx)
            lines += [f".SS {_roff(sub_name)} {_roff(_usage(sub, sub_ctx))}",
                      _roff(" ".join((sub.help or "").split())) or "\\&",
                      *_options(sub, sub_ctx)]
    if path:
        lines += [".SH SEE ALSO", "\\fBminidisk\\fR(1)"]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """{file name: page} for minidisk(1) and every command."""
    from minidisk.cli.main import cli

    root = click.Context(cli, info_name="minidisk")
    found = {"minidisk.1": page([], cli, root)}
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        if command is not None:
            found[f"minidisk-{name}.1"] = page([name], command, root)
    return found


@click.command("man")
@click.argument("command", required=False)
@click.option("--install", "directory", metavar="DIR",
              help="Write every page into DIR/man1 (e.g. /usr/local/share/man).")
def man(command: str | None, directory: str | None) -> None:
    """Manual pages made from the commands: print COMMAND's (troff; `man -l -` shows it), or
    write them all with --install DIR."""
    everything = pages()
    if directory is None:
        name = f"minidisk-{command}.1" if command else "minidisk.1"
        if name not in everything:
            fail(f"no command {command!r}: see `minidisk --help`", code=2)
        click.echo(everything[name], nl=False)
        return
    if not os.path.isdir(directory):
        fail(f"--install {directory}: no such directory", code=2)
    section = Path(directory) / "man1"
    section.mkdir(exist_ok=True)
    for name, text in everything.items():
        (section / name).write_text(text)
        click.echo(section / name)


def register(cli: click.Group) -> None:
    cli.add_command(man)
