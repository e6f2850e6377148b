"""Who reaches the control channel: the policy objects, in memory, and the server asking the
one it was given (the daemon injects its own; nothing subclasses the server for it)."""

from __future__ import annotations

import os

import pytest

from minidisk.nbd.exports import Administrators, DictExports, Identity, authenticated
from minidisk.nbd.server import NBDServer
from minidisk.nbd.transport import Transport

OURS = os.geteuid()
OTHER = OURS + 4242  # no uid of this host needed: the policy only compares numbers


@pytest.mark.parametrize(("identity", "admin"), [
    (Identity(Transport.UNIX, uid=OURS), True),
    (Identity(Transport.UNIX, uid=0), True),
    (Identity(Transport.STDIO, uid=OURS), True),  # stdin/stdout a socketpair of ours
    (Identity(Transport.UNIX, uid=OTHER), False),
    (Identity(Transport.UNIX), False),  # no SO_PEERCRED: nobody proved anything
    (Identity(Transport.TCP, address="127.0.0.1"), False),  # plain TCP never, not even locally
    (Identity(Transport.TCP, subject="CN=ops", tls=True), True),
    (Identity(Transport.TCP, subject="CN=bob", tls=True), False),  # a certificate, not a listed one
    (Identity(Transport.TCP, subject="CN=ops", tls=False), False),  # a subject TLS did not verify
    (Identity(Transport.UNIX, uid=OTHER, subject="CN=ops", tls=True), False),  # the uid decides
])
def test_administrators(identity: Identity, admin: bool) -> None:
    assert Administrators(frozenset({"CN=ops"}))(identity) is admin


@pytest.mark.parametrize(("identity", "proved"), [
    (Identity(Transport.UNIX, uid=OTHER), True),
    (Identity(Transport.TCP, subject="CN=bob", tls=True), True),
    (Identity(Transport.TCP, address="192.0.2.1"), False),
    (Identity(Transport.TCP, subject="", tls=True), False),  # TLS without a client certificate
    (Identity(Transport.UNIX), False),
])
def test_authenticated(identity: Identity, proved: bool) -> None:
    assert authenticated(identity) is proved


async def _no_control(identity: Identity, request: bytes) -> bytes:
    raise AssertionError("not called here")


def test_the_server_asks_its_injected_policy() -> None:
    asked: list[Identity] = []

    def only_bob(identity: Identity) -> bool:
        asked.append(identity)
        return identity.uid == OTHER

    bob, alice = Identity(Transport.UNIX, uid=OTHER), Identity(Transport.UNIX, uid=OURS)
    server = NBDServer(DictExports({}), control=_no_control, control_policy=only_bob)
    assert server.offers_control(bob) and not server.offers_control(alice)
    assert asked == [bob, alice]
    # Without a control handler there is nothing to offer, whatever the policy says.
    assert not NBDServer(DictExports({}), control_policy=only_bob).offers_control(bob)
    # The default: our uid (or root) on a unix socket, and no TLS subject.
    default = NBDServer(DictExports({}), control=_no_control)
    assert default.offers_control(alice) and not default.offers_control(bob)
    assert not default.offers_control(Identity(Transport.TCP, subject="CN=ops", tls=True))
