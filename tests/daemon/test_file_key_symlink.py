"""`serve --file KEY=PATH` opens PATH by descriptor and does not follow a symlink (as root, a
planted link would serve or overwrite a file elsewhere)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.harness import MINIDISK


def test_a_symlinked_file_key_is_refused(short_tmp: Path) -> None:
    victim = short_tmp / "victim"
    victim.write_bytes(b"secret")
    (short_tmp / "link").symlink_to(victim)
    before = victim.stat()
    done = subprocess.run([MINIDISK, "serve", "--file", f"/k={short_tmp / 'link'}",
                           f"unix://{short_tmp / 's.sock'}"], capture_output=True, text=True,
                          timeout=60)
    # Before: the server started (detached) and served the victim.
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{short_tmp / 'link'}: a symbolic link" in lines[0]
    assert not os.path.exists(short_tmp / "s.sock")
    after = victim.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
