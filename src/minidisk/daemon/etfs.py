"""Control commands that change a running server's namespace (`minidisk etfs ...`)."""

from __future__ import annotations

from typing import Any

from minidisk.daemon.control import Handler
from minidisk.namespace import RUMP_ETFS_SIZE_ENDOFF, Namespace, apply, parse


def control_handlers(namespace: Namespace) -> dict[str, Handler]:
    async def ls(args: dict[str, Any]) -> dict[str, Any]:
        return {"keys": [{"key": row.key, "type": row.type, "hostpath": row.hostpath,
                          "begin": row.begin, "size": row.size, "users": row.users,
                          "description": row.description} for row in namespace.ls()]}

    async def register(args: dict[str, Any]) -> dict[str, Any]:
        if "drivespec" in args:
            applied = apply(parse(str(args["drivespec"])), namespace)
            return {"key": applied.key}
        size = args.get("size")
        key = namespace.register(
            str(args["key"]), str(args["hostpath"]), str(args.get("type", "blk")),
            int(args.get("begin", 0)),
            RUMP_ETFS_SIZE_ENDOFF if size is None else int(size))
        return {"key": key}

    async def remove(args: dict[str, Any]) -> dict[str, Any]:
        await namespace.remove(str(args["key"]), force=bool(args.get("force", False)))
        return {}

    return {"etfs.ls": ls, "etfs.register": register, "etfs.remove": remove}
