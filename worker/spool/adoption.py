"""Who delivers a spool folder whose worker is gone: the adoption rule.

Every worker owns ``<delivery.spool>/<name>/`` and holds its ``lock`` (an
flock, dropped by the kernel when the process dies, even by ``kill -9``)
from before it reads the folder until it has stopped delivering.

1. **Same name.** A worker's replacement under the same name (after a
   crash, a hang, ``kill -9`` or a restart of the whole cluster) opens the
   same folder and replays it in ``load_all``: nothing is adopted.
   :func:`open_spool` waits a little for the lock, for the moment when an
   older process of that name or an adopter still holds it.
2. **Orphans.** Any other folder is orphaned when its name is not one the
   cluster runs or is about to run. The coordinator sends the names to keep
   (:class:`coordinator.spools.AdoptionSweep`): every worker it knows
   (started, joining, in the ring, leaving), and for a minute after it was
   last started or exited every worker not retired by a scale-down (the
   supervisor restarts a dead worker within 30 s); the names of the N
   workers a supervisor is asked to run count as seen when the coordinator
   first learns of them. Orphans are thus the folders of workers retired by
   ``sendguard scale`` (once they have exited), of names left over from a
   run with more workers (``server.workers`` lowered across a restart), and
   of a worker that was not restarted within that minute.
3. **Who adopts.** Every couple of seconds the coordinator asks one serving
   worker of each host, the first in ring order, to adopt the orphans
   beside its own folder that hold anything; it claims each with
   :meth:`BaseSpool.adopt_live` and queues the records it took.

Why two live workers can never deliver the same spool: a claim renames the
orphan's ``active/`` into the adopter's own folder in one ``rename(2)``,
and only while holding the orphan's lock. A worker that can still deliver
holds its own lock, so a claim on its folder fails with
:class:`SpoolLocked` (skipped; the next sweep tries again), and the rename
leaves every record in exactly one spool, so a rival adopter finds nothing
left. The name rule only decides which folders are worth trying; a wrong
guess (a folder claimed while its worker is being restarted) costs nothing
but that the replacement starts with an empty queue while its messages are
delivered by the adopter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cluster.logjson import log_event

from .base import WORKER_RE, BaseSpool, SpoolLocked, names_in
from .record import SpoolRecord
from .store import Spool

OPEN_WAIT = 15.0
_OPEN_RETRY = 0.1


async def open_spool(directory: Path, name: str, wait: float = OPEN_WAIT) -> BaseSpool:
    """This worker's own spool, waiting up to ``wait`` seconds for its lock."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return Spool(directory, name)
        except SpoolLocked:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(_OPEN_RETRY)


def orphans(spool: BaseSpool, keep: Iterable[str]) -> list[Path]:
    """Sibling folders not named in ``keep`` that hold records (or claimed batches)."""
    root = spool.root.parent
    kept = set(keep) | {spool.worker}
    found = []
    for name in names_in(root):
        path = root / name
        if (name in kept or name in (".", "..") or not WORKER_RE.fullmatch(name)
                or path.is_symlink() or not path.is_dir()):
            continue
        if names_in(path / "active") or names_in(path / "adopt"):
            found.append(path)
    return found


async def adopt_orphans(spool: BaseSpool, keep: Iterable[str],
                        enqueue: Callable[[SpoolRecord], None]) -> dict[str, Any]:
    """Claim every orphan; ``{"adopted": {name: messages}, "busy": [names in use]}``."""
    adopted: dict[str, int] = {}
    busy: list[str] = []
    for path in orphans(spool, keep):
        try:
            records = await spool.adopt_live(path)
        except SpoolLocked:
            busy.append(path.name)
            continue
        for record in records:
            enqueue(record)
        adopted[path.name] = len(records)
        log_event("spool_adopted", worker=spool.worker, from_worker=path.name,
                  messages=len(records))
    return {"adopted": adopted, "busy": busy}
