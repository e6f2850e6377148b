"""The lock manager's state read out, for `minidisk dlm status`: whole (`snapshot`), or one
small piece at a time in pages that resume where the last one stopped (`pieces`, `Cursor`).
Reads the engine's domains, changes nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping
from typing import Any

from minidisk.dlm.state import Domain, Resource

# Where a listing stopped: (domain, resource, locks of it listed); "" sorts before any name.
Cursor = tuple[str, str, int]
# Resource names sorted at a time while listing: about a status page's worth, so a page
# costs one pass over the domain's names (a C-level filter: 20 ms for a million names).
_LISTING_BATCH = 4096


def snapshot(domains: Mapping[str, Domain]) -> dict[str, Any]:
    """Everything, as plain JSON-able data: `pieces()` put together."""
    out: list[dict[str, Any]] = []
    for _, kind, piece in pieces(domains):
        if kind == "domain":
            out.append({**piece, "resources": []})
        elif kind == "resource":
            out[-1]["resources"].append(
                {**piece, "granted": [], "converting": [], "waiting": []})
        else:
            out[-1]["resources"][-1][kind].append(piece)
    return {"domains": out}


def pieces(domains: Mapping[str, Domain], after: Cursor | None = None
           ) -> Iterator[tuple[Cursor, str, Any]]:
    """Everything, one small piece at a time, for `minidisk dlm status`: domains by name,
    each followed by its resources by name, each followed by its locks in queue order.
    Yields (position after the piece, kind, piece): kind "domain" (name, members),
    "resource" (name, lvb) or a queue name ("granted", "converting", "waiting": a lock).

    Resumes after `after`, a position it yielded, so a listing can be taken in pages
    between which anything may change: what was there all along is listed once, in
    order. Nothing is sorted whole: a page's worth of names at a time (`_LISTING_BATCH`)."""
    after_domain, after_resource, locks_done = after or ("", "", 0)
    for dom_name in sorted(name for name in domains if name >= after_domain):
        dom = domains[dom_name]
        resume = dom_name == after_domain
        if not resume:
            yield (dom_name, "", 0), "domain", {
                "name": dom.name, "members": sorted(str(m) for m in dom.members)}
        last = after_resource if resume else ""
        if resume and last in dom.resources:
            yield from _lock_pieces(dom, dom.resources[last], locks_done)
        while True:
            batch = heapq.nsmallest(_LISTING_BATCH, filter(last.__lt__, dom.resources))
            for res_name in batch:
                res = dom.resources.get(res_name)
                if res is None:  # dropped while the listing was paused
                    continue
                yield (dom_name, res_name, 0), "resource", {
                    "name": res.name,
                    "lvb": {"valid": res.lvb_valid, "seq": res.lvb_seq,
                            "hex": res.lvb.hex()}}
                yield from _lock_pieces(dom, res, 0)
            if len(batch) < _LISTING_BATCH:
                break
            last = batch[-1]


def _lock_pieces(dom: Domain, res: Resource, skip: int) -> Iterator[tuple[Cursor, str, Any]]:
    at = 0
    for queue, locks in (("granted", res.granted), ("converting", res.converting),
                         ("waiting", res.waiting)):
        for lk in locks.values():
            at += 1
            if at <= skip:
                continue
            yield (dom.name, res.name, at), queue, {
                "lkid": lk.lkid,
                "owner": None if lk.owner is None else str(lk.owner),
                "orphan_of": None if lk.orphan_of is None else str(lk.orphan_of),
                "grmode": None if lk.grmode is None else lk.grmode.name,
                "rqmode": None if lk.rqmode is None else lk.rqmode.name,
                "token": lk.token,
                "persistent": lk.persistent,
            }
