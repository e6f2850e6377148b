"""Every request check, in one place, before a device sees the request.

The order follows nbdkit's server/protocol.c (validate_request) with one deliberate change:
a write to a read-only export is EPERM even when it is also out of range or unadvertised,
because "this export is read-only" is the more useful answer (proto.md: the server SHOULD
return EPERM for writes and trims on a read-only export).
"""

from __future__ import annotations

from minidisk.device.api import MAX_REQUEST, BlockDevice
from minidisk.nbd import protocol as p
from minidisk.nbd.negotiation import TransmissionTerms

# Beyond this a READ is refused and a WRITE payload is drained and refused; a WRITE payload
# larger than MAX_DRAIN cannot be drained at reasonable cost, so the connection is dropped
# (nbdkit draws the same line at 128 MiB). proto.md: payloads up to 32 MiB SHOULD NOT be
# treated as a denial of service even above the advertised maximum.
MAX_DRAIN = 128 * 1024 * 1024
# The largest READ or WRITE served when the device has no limit of its own below the
# advertised MAX_REQUEST: nbdkit's MAX_REQUEST_SIZE. Clients that never saw the advertised
# maximum (EXPORT_NAME) send more than it: nbd-tester-client up to ~48 MiB.
MAX_PAYLOAD = 64 * 1024 * 1024

_WRITES = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
_RANGED = (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_CACHE, p.CMD_WRITE_ZEROES,
           p.CMD_BLOCK_STATUS)


def check_request(
    session: TransmissionTerms, device: BlockDevice, cmd: int, flags: int, offset: int,
    length: int,
) -> tuple[int, str]:
    """Return (0, "") for a valid request, else (NBD error, reason)."""
    tflags = session.tflags
    if cmd not in p.CMD_NAMES or cmd == p.CMD_DISC:
        return p.NBD_EINVAL, f"unknown command {cmd}"
    if flags & ~p.KNOWN_CMD_FLAGS:
        return p.NBD_EINVAL, f"unknown flags {flags:#x}"
    if flags & (p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO) and cmd != p.CMD_WRITE_ZEROES:
        return p.NBD_EINVAL, "NO_HOLE and FAST_ZERO are only valid on WRITE_ZEROES"
    if flags & p.CMD_FLAG_FAST_ZERO and not tflags & p.TFLAG_SEND_FAST_ZERO:
        return p.NBD_EINVAL, "FAST_ZERO was not advertised"
    if flags & p.CMD_FLAG_DF and (cmd != p.CMD_READ or not session.structured):
        return p.NBD_EINVAL, "DF is only valid on READ with structured replies"
    if flags & p.CMD_FLAG_REQ_ONE and cmd != p.CMD_BLOCK_STATUS:
        return p.NBD_EINVAL, "REQ_ONE is only valid on BLOCK_STATUS"
    if flags & p.CMD_FLAG_FUA and not tflags & p.TFLAG_SEND_FUA:
        return p.NBD_EINVAL, "FUA was not advertised"
    if cmd in _WRITES and tflags & p.TFLAG_READ_ONLY:
        return p.NBD_EPERM, "export is read-only"
    if cmd == p.CMD_FLUSH:
        if not tflags & p.TFLAG_SEND_FLUSH:
            return p.NBD_EINVAL, "FLUSH was not advertised"
        if offset or length:
            return p.NBD_EINVAL, "FLUSH must have zero offset and length"
        return 0, ""
    unadvertised = {p.CMD_TRIM: p.TFLAG_SEND_TRIM, p.CMD_WRITE_ZEROES: p.TFLAG_SEND_WRITE_ZEROES,
                    p.CMD_CACHE: p.TFLAG_SEND_CACHE}.get(cmd)
    if unadvertised is not None and not tflags & unadvertised:
        return p.NBD_EINVAL, f"{p.CMD_NAMES[cmd]} was not advertised"
    if cmd == p.CMD_BLOCK_STATUS and not session.base_allocation:
        return p.NBD_EINVAL, "no metadata context was negotiated"
    if cmd in _RANGED and offset + length > device.size:
        err = p.NBD_ENOSPC if cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.NBD_EINVAL
        return err, f"{offset}+{length} is past the end of the device ({device.size})"
    bs = device.block_size
    if bs.minimum > 1 and (offset % bs.minimum or length % bs.minimum):
        return p.NBD_EINVAL, f"request is not aligned to {bs.minimum} bytes"
    limit = bs.maximum if bs.maximum < MAX_REQUEST else MAX_PAYLOAD
    if cmd in (p.CMD_READ, p.CMD_WRITE) and length > limit:
        if flags & p.CMD_FLAG_DF:
            return p.NBD_EOVERFLOW, f"{length} bytes cannot be sent as one chunk"
        return p.NBD_EINVAL, f"{length} bytes is over the maximum of {limit}"
    if cmd == p.CMD_BLOCK_STATUS and length == 0:
        return p.NBD_EINVAL, "BLOCK_STATUS of zero length"
    return 0, ""
