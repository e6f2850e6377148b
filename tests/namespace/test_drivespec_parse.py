"""Drivespec parsing: rump_server's grammar, every bad input we could think of, properties."""

from __future__ import annotations

from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidisk.namespace.drivespec import Drivespec, DrivespecError, parse
from minidisk.namespace.keys import EtfsType
from minidisk.namespace.partitions import LABEL_PARTITION_LETTERS
from minidisk.namespace.sizes import MAX_SIZE

BLK = EtfsType.BLK


@pytest.mark.parametrize(("text", "expected"), [
    ("key=/d,hostpath=f,size=1m", Drivespec("/d", "f", BLK, 1 << 20)),
    ("hostpath=f,size=1m,key=/d", Drivespec("/d", "f", BLK, 1 << 20)),
    ("key=///d,hostpath=f,size=2x512", Drivespec("/d", "f", BLK, 1024)),
    ("key=/d//e,hostpath=f,size=2*512", Drivespec("/d//e", "f", BLK, 1024)),
    ("key=/d,hostpath=f,size=1k,offset=3b,type=chr",
     Drivespec("/d", "f", EtfsType.CHR, 1024, offset=1536)),
    ("key=/d,hostpath=f,type=reg", Drivespec("/d", "f", EtfsType.REG)),
    ("key=/d,hostpath=f,type=reg,offset=1k", Drivespec("/d", "f", EtfsType.REG, offset=1024)),
    ("key=/d,hostpath=f,size=host", Drivespec("/d", "f", BLK, size_from_host=True)),
    ("key=/d,hostpath=f,disklabel=a", Drivespec("/d", "f", BLK, disklabel="a")),
    ("key=/d,hostpath=f,disklabel=v,type=chr",
     Drivespec("/d", "f", EtfsType.CHR, disklabel="v")),
    ("key=/d,hostpath=f,partition=5", Drivespec("/d", "f", BLK, partition=5)),
    ("key=/d,hostpath=f,partition=007", Drivespec("/d", "f", BLK, partition=7)),
    ("key=/d,hostpath=f,type=dir", Drivespec("/d", "f", EtfsType.DIR)),
    ("key=/d,hostpath=f,type=dir_subdirs", Drivespec("/d", "f", EtfsType.DIR_SUBDIRS)),
    ("key=/d,hostpath=a=b,size=1", Drivespec("/d", "a=b", BLK, 1)),
    ("key=/d,hostpath=f,size=8388607t",  # huge, but a valid off_t: the file system decides
     Drivespec("/d", "f", BLK, 8388607 << 40)),
])
def test_good(text: str, expected: Drivespec) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(("text", "token", "value", "reason"), [
    # Tokens.
    ("", "", None, "invalid drivespec token"),
    ("key=/d,,hostpath=f,size=1", "", None, "invalid drivespec token"),
    ("key=/d,hostpath=f,size=1,", "", None, "invalid drivespec token"),
    ("key=/d,hostpath=f,size=1,foo=bar", "foo", "bar", "invalid drivespec token"),
    ("key=/d,hostpath=f,size=1,KEY=/e", "KEY", "/e", "invalid drivespec token"),
    ("key=/d,hostpath=f,size=1, type=reg", " type", "reg", "invalid drivespec token"),
    ("key=/d,hostpath=f,size=1,key=/e", "key", "/e", "key already given"),
    ("key=/d,hostpath=f,hostpath=g,size=1", "hostpath", "g", "hostpath already given"),
    ("key=/d,hostpath=f,size=0,size=0", "size", "0", "size already given"),
    ("key=/d,hostpath=f,size=1,offset=0,offset=0", "offset", "0", "offset already given"),
    ("key=/d,hostpath=f,type=reg,type=reg", "type", "reg", "type already given"),
    ("key=/d,hostpath=f,disklabel=a,disklabel=a", "disklabel", "a", "already given"),
    ("key=/d,hostpath=f,partition=1,partition=1", "partition", "1", "already given"),
    ("key,hostpath=f,size=1", "key", None, "needs a value"),
    ("key=,hostpath=f,size=1", "key", None, "needs a value"),
    ("key=/d,hostpath=,size=1", "hostpath", None, "needs a value"),
    ("key=/d,hostpath=f,size=", "size", None, "needs a value"),
    # Required tokens.
    ("hostpath=f,size=1", "key", None, "required"),
    ("key=/d,size=1", "hostpath", None, "required"),
    ("key=/d,hostpath=f", "size", None, "needs size"),
    ("key=/d,hostpath=f,type=chr", "size", None, "needs size"),
    ("key=/d,hostpath=f,offset=1k", "size", None, "needs size"),
    # Keys.
    ("key=d,hostpath=f,size=1", "key", "d", "does not begin with '/'"),
    ("key=/,hostpath=f,size=1", "key", "/", "names nothing"),
    ("key=///,hostpath=f,size=1", "key", "///", "names nothing"),
    ("key=/" + "k" * 4097 + ",hostpath=f,size=1", "key", "/" + "k" * 4097, "longer than"),
    # Types.
    ("key=/d,hostpath=f,size=1,type=BLK", "type", "BLK", "unknown type"),
    ("key=/d,hostpath=f,size=1,type=block", "type", "block", "unknown type"),
    ("key=/d,hostpath=f,size=1,type=dir", "size", "1", "type=dir takes no size"),
    ("key=/d,hostpath=f,type=dir_subdirs,offset=1", "offset", "1", "takes no offset"),
    ("key=/d,hostpath=f,type=dir,disklabel=a", "disklabel", "a", "takes no disklabel"),
    ("key=/d,hostpath=f,type=dir,partition=1", "partition", "1", "takes no partition"),
    # Sizes.
    ("key=/d,hostpath=f,size=0", "size", "0", "greater than zero"),
    ("key=/d,hostpath=f,size=0x512", "size", "0x512", "greater than zero"),
    ("key=/d,hostpath=f,size=1Q", "size", "1Q", "illegal number"),  # 1M is a size now
    ("key=/d,hostpath=f,size=-1", "size", "-1", "illegal number"),
    ("key=/d,hostpath=f,size=1.5k", "size", "1.5k", "illegal number"),
    ("key=/d,hostpath=f,size=hosts", "size", "hosts", "illegal number"),
    ("key=/d,hostpath=f,size=1,offset=k", "offset", "k", "illegal number"),
    ("key=/d,hostpath=f,size=99999999999999999999", "size", "99999999999999999999", "too large"),
    ("key=/d,hostpath=f,size=1,offset=8388608t", "offset", "8388608t", "too large"),
    ("key=/d,hostpath=f,size=8388607t,offset=1t", "offset", "1t", "ends past"),
    ("key=/d,hostpath=f,size=1,offset=1tx1tx1t", "offset", "1tx1tx1t", "too large"),
    # size=host and offset, in either order.
    ("key=/d,hostpath=f,size=host,offset=1k", "size", "host", "not.*offset=1k"),
    ("key=/d,hostpath=f,offset=1k,size=host", "size", "host", "not.*offset=1k"),
    ("key=/d,hostpath=f,offset=0,size=host", "size", "host", "not.*offset=0"),
    # disklabel and partition must be alone, in either order.
    ("key=/d,hostpath=f,disklabel=a,size=1m", "disklabel", "a", "alone, not with size=1m"),
    ("key=/d,hostpath=f,size=1m,disklabel=a", "disklabel", "a", "alone, not with size=1m"),
    ("key=/d,hostpath=f,disklabel=a,offset=1k", "disklabel", "a", "not with offset=1k"),
    ("key=/d,hostpath=f,offset=1k,disklabel=a", "disklabel", "a", "not with offset=1k"),
    ("key=/d,hostpath=f,disklabel=a,size=host", "disklabel", "a", "not with size=host"),
    ("key=/d,hostpath=f,partition=1,disklabel=a", "disklabel", "a", "not with partition=1"),
    ("key=/d,hostpath=f,partition=1,size=1m", "partition", "1", "not with size=1m"),
    ("key=/d,hostpath=f,offset=1,partition=1", "partition", "1", "not with offset=1"),
    ("key=/d,hostpath=f,disklabel=w", "disklabel", "w", "not a partition letter"),
    ("key=/d,hostpath=f,disklabel=A", "disklabel", "A", "not a partition letter"),
    ("key=/d,hostpath=f,disklabel=ab", "disklabel", "ab", "not a partition letter"),
    ("key=/d,hostpath=f,partition=0", "partition", "0", "not a partition number"),
    ("key=/d,hostpath=f,partition=-1", "partition", "-1", "not a partition number"),
    ("key=/d,hostpath=f,partition=p1", "partition", "p1", "not a partition number"),
    ("key=/d,hostpath=f,partition=99999999", "partition", "99999999", "not a partition number"),
    ("key=/d,hostpath=f,partition=²", "partition", "²", "not a partition number"),
])
def test_bad(text: str, token: str, value: str | None, reason: str) -> None:
    with pytest.raises(DrivespecError, match=reason) as info:
        parse(text)
    error = info.value
    assert (error.token, error.value) == (token, value)
    message = str(error)
    assert "\n" not in message
    assert message.startswith(token if value is None else f"{token}={value}: ")


value_chars = st.characters(blacklist_characters=",\0", blacklist_categories=["Cs"])
keys = (st.text(value_chars, min_size=1, max_size=40)
        .map(lambda s: "/" + s.lstrip("/")).filter(lambda k: k != "/"))
hostpaths = st.text(value_chars, min_size=1, max_size=40)


@st.composite
def drivespecs(draw: st.DrawFn) -> Drivespec:
    key, hostpath = draw(keys), draw(hostpaths)
    kind = draw(st.sampled_from(["size", "host", "label", "partition", "reg", "dir"]))
    etfs_type = draw(st.sampled_from([EtfsType.BLK, EtfsType.CHR, EtfsType.REG]))
    if kind == "size":
        size = draw(st.integers(1, 1 << 50))
        return Drivespec(key, hostpath, etfs_type, size, offset=draw(st.integers(0, 1 << 50)))
    if kind == "host":
        return Drivespec(key, hostpath, etfs_type, size_from_host=True)
    if kind == "label":
        return Drivespec(key, hostpath, etfs_type,
                         disklabel=draw(st.sampled_from(LABEL_PARTITION_LETTERS)))
    if kind == "partition":
        return Drivespec(key, hostpath, etfs_type, partition=draw(st.integers(1, 1 << 16)))
    if kind == "reg":
        return Drivespec(key, hostpath, EtfsType.REG, offset=draw(st.integers(0, MAX_SIZE)))
    return Drivespec(key, hostpath, draw(st.sampled_from([EtfsType.DIR, EtfsType.DIR_SUBDIRS])))


@given(drivespecs())
def test_format_parses_back(spec: Drivespec) -> None:
    assert parse(spec.format()) == spec


@given(drivespecs(), st.randoms())
def test_token_order_does_not_matter(spec: Drivespec, random: Random) -> None:
    tokens = spec.format().split(",")
    random.shuffle(tokens)
    assert parse(",".join(tokens)) == spec


@given(drivespecs(), st.data())
def test_any_repeated_token_is_refused_by_name(spec: Drivespec, data: st.DataObject) -> None:
    tokens = spec.format().split(",")
    repeated = data.draw(st.sampled_from(tokens))
    name = repeated.split("=", 1)[0]
    with pytest.raises(DrivespecError, match=f"{name} already given") as info:
        parse(",".join([*tokens, repeated]))
    assert info.value.token == name


@given(st.text(st.sampled_from("key=/hostpath,sizeoffsetdisklabeltypereg0123456789kmxbh*"),
               max_size=80))
def test_garbage_raises_only_drivespec_error(text: str) -> None:
    try:
        spec = parse(text)
    except DrivespecError as e:
        assert "\n" not in str(e) and e.token in str(e)
    else:
        assert spec.key.startswith("/") and spec.hostpath
