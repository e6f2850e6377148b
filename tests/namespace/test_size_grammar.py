"""One size grammar for every option: rump_server's lowercase suffixes plus IEC/SI ones."""

from __future__ import annotations

import pytest

from minidisk.daemon.config import DaemonConfig
from minidisk.namespace.sizes import SizeError, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("8b", 4096), ("1k", 1024), ("1K", 1024), ("1KiB", 1024), ("1kB", 1000), ("1KB", 1000),
    ("1G", 1 << 30), ("1GiB", 1 << 30), ("1GB", 10**9), ("2T", 2 << 40), ("1P", 1 << 50),
    ("3MB", 3 * 10**6), ("2xG", -1),
])
def test_suffixes(text: str, expected: int) -> None:
    if expected < 0:
        with pytest.raises(SizeError):
            parse_size(text)
    else:
        assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["1kb", "1gib", "1Gib", "12q", "1B", "1bb"])
def test_refused(text: str) -> None:
    with pytest.raises(SizeError, match="illegal number"):
        parse_size(text)


def test_b_means_512_in_memory_and_drivespecs_alike() -> None:
    config = DaemonConfig.load({"memory": ("d=8b",), "null": ("n=1G",), "url": ("-",)})
    assert config.memory == [("/d", 4096)] and config.null == [("/n", 1 << 30)]
    assert parse_size("8b") == 4096  # drivespec size= and etfs --size parse the same


def test_error_names_the_option() -> None:
    with pytest.raises(ValueError, match=r"--memory d=12q: '12q'"):
        DaemonConfig.load({"memory": ("d=12q",), "url": ("-",)})
