"""`minidisk dmsetup` against a server: the options scripts written for dmsetup use, and
the exact text they read back."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from dm_helpers import Server

pytestmark = pytest.mark.slow


def test_target_option_on_table_status_and_ls(serve: Callable[..., Server]) -> None:
    server = serve("--memory=/dev/a=1M")
    server.dmsetup("create", "mixed", stdin="0 8 linear /dev/a 0\n8 8 zero\n16 8 linear /dev/a 8")
    server.dmsetup("create", "zeros", "--table", "0 8 zero")
    server.dmsetup("create", "empty", "--notable")
    assert server.dmsetup("table", "--target", "linear").stdout == \
        "mixed: 0 8 linear /dev/a 0\nmixed: 16 8 linear /dev/a 8\n"
    assert server.dmsetup("status", "--target", "zero").stdout == \
        "mixed: 8 8 zero \nzeros: 0 8 zero \n"
    assert server.dmsetup("table", "--target", "zero", "mixed").stdout == "8 8 zero \n"
    # a device without such segments prints nothing at all, not an empty line
    assert server.dmsetup("table", "--target", "linear", "zeros").stdout == ""
    assert server.dmsetup("status", "--target", "error").stdout == ""
    # ls --target goes through dmsetup's table code: (major, minor), no tree
    assert server.dmsetup("ls", "--target", "zero").stdout == \
        "mixed\t(253, 0)\nzeros\t(253, 1)\n"
    assert server.dmsetup("ls", "--target", "zero", "--tree").stdout == \
        "mixed\t(253, 0)\nzeros\t(253, 1)\n"
    assert server.dmsetup("ls", "--target", "striped").stdout == ""
