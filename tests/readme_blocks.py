"""README.md's code blocks, as tests/test_readme.py runs them: extract, run, check.

Every fence in the README says what it holds: ```sh and ```python blocks are run, ```text
blocks are synopses (grammar with brackets and placeholders, never run). A line right above
a fence may tell the runner more, invisibly in the rendered page:

    <!-- readme-test: after as=bob file=disk.py autofs -->

- ``after``: this block continues the one above: the same namespace, its servers still up.
  Blocks joined so form one chain, one test.
- ``as=USER``: run the block as USER (alice and bob exist in every chain's /etc/passwd).
- ``file=NAME``: do not run this block; save it as NAME for a later block of the chain.
- ``autofs``: the chain needs the kernel's autofs (it runs where the autofs tests run).
- ``by=TEST``: a test of its own in tests/test_readme.py runs this block (the README's two
  set-up commands: one of them is this very suite).

Shell blocks run under ``bash -euo pipefail``. A line ``$ COMMAND`` is a command whose output
is the README's: the lines below it, up to a blank line or the next ``$`` line, must equal its
stdout and stderr together (its exit status is not checked: the output shows a refusal as
well as a success). Other lines run as they are, and any of them failing fails the block.

A chain runs in namespaces of its own (`unshare --mount --pid`): /tmp, /srv, /mnt,
/run/minidisk, /etc/minidisk, /var/lib/minidisk, /dlm and /vmlink are fresh tmpfs mounts
there, so the README's absolute paths name nothing of this machine's, and when the chain's
shell exits the kernel kills whatever it left running (servers the README starts detach and
are never halted there); its mounts go with the mount namespace.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

RUN_LANGUAGES = {"sh", "python"}
LANGUAGES = RUN_LANGUAGES | {"text"}
DIRECTIVE = re.compile(r"<!--\s*readme-test:(?P<words>.*?)-->\s*$")
# Directories a chain gets fresh: every absolute path the README writes below.
FRESH_DIRECTORIES = ("/tmp", "/srv", "/mnt", "/run/minidisk", "/etc/minidisk",
                     "/var/lib/minidisk", "/dlm", "/vmlink")
USERS = {"alice": 2701, "bob": 2702}  # made in each chain's own /etc/passwd and /etc/group


def named_directories(text: str) -> list[str]:
    """The FRESH_DIRECTORIES that `text` names as a path of its own (`/dlm/x`, `"/dlm"`), not
    as the tail of another one (`unix:///run/minidisk/dlm.sock` names no /dlm)."""
    return [name for name in FRESH_DIRECTORIES
            if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text)]


class ReadmeError(ValueError):
    """A fence or directive this runner cannot read; the message names its line."""


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    after: bool = False
    user: str | None = None
    file: str | None = None
    autofs: bool = False
    by: str | None = None

    @property
    def runs(self) -> bool:
        """Whether the chains run it (a `by=` block has a test of its own)."""
        return self.language in RUN_LANGUAGES and self.by is None


@dataclass
class Expectation:
    """A `$ COMMAND` line of a shell block and the output the README shows for it."""
    command: str
    output: str
    output_path: Path  # where the run leaves what the command printed


@dataclass
class Chain:
    blocks: list[Block] = field(default_factory=list)

    @property
    def name(self) -> str:
        lines = f"{self.blocks[0].line}-{self.blocks[-1].line}" if self.blocks[1:] else \
            str(self.blocks[0].line)
        return f"README.md:{lines}"

    @property
    def autofs(self) -> bool:
        return any(b.autofs for b in self.blocks)


def parse(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with their directives."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("```"):
            i += 1
            continue
        language = line[3:].strip()
        if language not in LANGUAGES:
            raise ReadmeError(f"README.md:{i + 1}: fence {line!r}: say ```sh, ```python or "
                              "```text (a synopsis, not run)")
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise ReadmeError(f"README.md:{i + 1}: the block is never closed")
        block = Block(i + 1, language, "\n".join(lines[i + 1:end]) + "\n")
        if i > 0 and (match := DIRECTIVE.match(lines[i - 1])):
            _apply(block, match["words"].split())
        blocks.append(block)
        i = end + 1
    return blocks


def _apply(block: Block, words: list[str]) -> None:
    for word in words:
        key, _, value = word.partition("=")
        if key == "after" and not value:
            block.after = True
        elif key == "autofs" and not value:
            block.autofs = True
        elif key == "as" and value in USERS:
            block.user = value
        elif key == "file" and value and "/" not in value:
            block.file = value
        elif key == "by" and value.startswith("test_"):
            block.by = value
        else:
            raise ReadmeError(f"README.md:{block.line - 1}: readme-test directive {word!r}: "
                              f"know after, autofs, as={'|'.join(USERS)}, file=NAME, by=TEST")
    if block.language == "text" and (block.user or block.file or block.after):
        raise ReadmeError(f"README.md:{block.line}: a ```text block is never run")


def chains(blocks: list[Block]) -> list[Chain]:
    """The runnable blocks grouped: a block marked `after` joins the chain before it. A chain
    that needs autofs from some block on also gives its blocks before that one as a chain of
    their own, so that they run where autofs is missing too."""
    result: list[Chain] = []
    for block in blocks:
        if not block.runs:
            continue
        if block.after:
            if not result:
                raise ReadmeError(f"README.md:{block.line}: `after` with no block above")
            result[-1].blocks.append(block)
        else:
            result.append(Chain([block]))
    prefixes = []
    for chain in result:
        first = next((i for i, b in enumerate(chain.blocks) if b.autofs), 0)
        if first:
            prefixes.append(Chain(chain.blocks[:first]))
    return result + prefixes


def shell_script(block: Block, outputs: Path) -> tuple[str, list[Expectation]]:
    """The bash script that runs a shell block, and what its `$` lines must print.

    Each `$ COMMAND` becomes ``COMMAND > OUTPUTS/N 2>&1 || true``: the caller compares file N
    with the README's text.
    """
    script: list[str] = []
    expected: list[Expectation] = []
    current: list[str] | None = None
    for line in block.text.splitlines():
        if line.startswith("$ "):
            if current is not None:
                expected[-1].output = "\n".join(current)
            command = line[2:]
            path = outputs / f"{block.line}-{len(expected)}"
            script.append(f"{{ {command}\n}} > {shlex.quote(str(path))} 2>&1 || true")
            expected.append(Expectation(command, "", path))
            current = []
        elif current is not None and line.strip():
            current.append(line)
            script.append("")  # keeps line numbers in bash's errors the README's
        else:
            if current is not None:
                expected[-1].output = "\n".join(current)
                current = None
            script.append(line)
    if current is not None:
        expected[-1].output = "\n".join(current)
    return "set -euo pipefail\n" + "\n".join(script) + "\n", expected
