"""Two counter nodes as two workers, for the counter benchmarks.

``bench_counters`` and ``bench_lease_upkeep`` ask from a node in their own
process ("asker") a node in a spawned process, over ipc:// as two workers
would; a pipe only sets the peer up (its endpoint, the ring, "active") and
stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.counters.node import CounterNode

# The three default windows of SPEC §3.4, with limits no run comes near.
WINDOWS = ((60.0, 250_000_000), (3600.0, 1_000_000_000), (43200.0, 10_000_000_000))


def process_cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def asker_and_peer(peer: str, prefix: str
                         ) -> AsyncIterator[tuple[CounterNode, list[str], int]]:
    """The asker's node, the ring's member names and the peer's pid, all on one ring."""
    from worker.counters.node import CounterNode
    from worker.counters.shard import CounterShard

    folder = tempfile.mkdtemp(dir="/tmp", prefix=prefix)
    os.chmod(folder, 0o700)
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    process = spawn.Process(target=_run_node, args=(peer, folder, child), daemon=True)
    process.start()
    asker = CounterNode("asker", f"ipc://{folder}/asker.sock", CounterShard(), 5.0)
    try:
        await asker.start()
        members = [(peer, await asyncio.to_thread(parent.recv)), ("asker", asker.endpoint)]
        parent.send(members)
        await asker.apply_ring(1, members)
        assert await asyncio.to_thread(parent.recv) and await asker.wait_active(10.0)
        yield asker, [name for name, _ in members], process.pid or 0
    finally:
        await asker.close()
        parent.send("stop")
        if parent.poll(10):
            parent.recv()
        process.join(5)
        if process.is_alive():
            process.kill()
        shutil.rmtree(folder, ignore_errors=True)


def _run_node(name: str, folder: str, conn: Connection) -> None:
    import uvloop

    uvloop.run(_serve(name, folder, conn))


async def _serve(name: str, folder: str, conn: Connection) -> None:
    from worker.counters.node import CounterNode
    from worker.counters.shard import CounterShard

    node = CounterNode(name, f"ipc://{folder}/{name}.sock", CounterShard(), 5.0)
    await node.start()
    conn.send(node.endpoint)
    members = await asyncio.to_thread(conn.recv)
    await node.apply_ring(1, members)
    conn.send(await node.wait_active(10.0))
    await asyncio.to_thread(conn.recv)  # told to stop
    await node.close()
    conn.send("closed")
