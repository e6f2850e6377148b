"""The lock manager: VMS/Linux DLM semantics (modes, queues, value blocks, basts, fencing
tokens), an embedded service on a unix socket, and a client for asyncio and trio.

`modes` and `engine` are pure logic over the plain data of `state`; `protocol` is the wire
format, decoding into the frozen dataclasses of `messages`; `service` hosts an engine; `client`
is a connection to a service (over `loops`, the asyncio/trio part), `lock` the Lock recipe on
it and `o2dlm` the libo2dlm face. Nothing here imports nbd or dm.
"""

from minidisk.dlm.engine import DlmError
from minidisk.dlm.modes import Mode, compatible
from minidisk.dlm.state import LVB_LEN, Flag

__all__ = ["LVB_LEN", "DlmError", "Flag", "Mode", "compatible"]
