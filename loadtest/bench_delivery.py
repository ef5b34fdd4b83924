"""Delivery throughput: how fast one worker's queue drains to a local sink.

    .venv/bin/python -m loadtest.bench_delivery --messages 3000 --connections 4

The spool is filled with ``--messages`` messages of ``--size`` bytes (one
recipient each, all to one destination), closed and reopened, as after a
restart with a full queue. A :class:`~worker.delivery.DeliveryAgent` then
loads it and delivers in smarthost mode to an aiosmtpd sink that discards
what it gets; the sink runs in its own process so that it does not share
the agent's core. The figure is delivered messages per second from
``start()`` until the queue is empty (or ``--time-limit`` runs out), with
every removal made durable in the spool. "cpu/msg" is the agent process's
CPU time per message, followed by the sink's: when the sink is near a
whole core, the figure measures aiosmtpd, not the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cluster.settings import parse_settings
from worker.counters.client import LocalCounters
from worker.counters.shard import CounterShard
from worker.delivery import DeliveryAgent
from worker.spool import Spool, SpoolRecord


class _Discard:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok: discarded"


def _sink(pipe: Connection) -> None:
    """The sink process: a bare aiosmtpd server on an ephemeral loopback port."""
    import uvloop
    from aiosmtpd.smtp import SMTP

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(_Discard(), hostname="sink.local"),
                                          "127.0.0.1", 0)
        pipe.send(server.sockets[0].getsockname()[1])
        while await loop.run_in_executor(None, pipe.recv) != "stop":
            pipe.send(_cpu())  # any other message asks for the CPU used so far
        server.close()

    uvloop.run(serve())


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _fill(directory: Path, n: int, size: int) -> float:
    body = b"Subject: bench\r\n\r\n" + (b"X" * 76 + b"\r\n") * (size // 78)
    spool = Spool(directory, "w0")
    spool.load_all()
    records = [
        SpoolRecord.new(session_id="piWs1j0010jifNx01iWsdh", client_ip="192.0.2.10",
                        account="jan@kowalski.pl", helo="laptop", mail_from="jan@kowalski.pl",
                        rcpt_tos=[f"user{i}@example.com"], message=body)
        for i in range(n)
    ]
    started = time.perf_counter()
    it = iter(records)

    async def writer() -> None:
        for record in it:
            await spool.store(record)

    await asyncio.gather(*(writer() for _ in range(64)))
    elapsed = time.perf_counter() - started
    await spool.aclose()
    return n / elapsed


async def _deliver(args: argparse.Namespace, directory: Path, port: int) -> dict[str, float]:
    settings = parse_settings(directory / "bench.toml", {
        "server": {"hostname": "bench.local", "listen": ["127.0.0.1:0"]},
        "tenants": {"file": "tenants.toml"},
        "delivery": {"mode": "smarthost", "smarthost": f"127.0.0.1:{port}",
                     "spool": str(directory)},
    })
    spool = Spool(directory, "w0")
    agent = DeliveryAgent(spool, lambda: settings, LocalCounters(CounterShard()), None,
                          per_destination=args.connections, max_connections=args.connections,
                          messages_per_connection=args.per_connection)
    cpu0, started = _cpu(), time.perf_counter()
    queued = await agent.start()
    deadline = started + args.time_limit
    while agent.queued and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    cpu = _cpu() - cpu0
    left = agent.queued
    stats = dict(agent.stats)
    opened = agent.pool.sessions_opened
    await agent.stop(5.0)
    await spool.aclose()
    done = queued - left
    return {"queued": queued, "delivered": stats["delivered"], "done": done, "left": left,
            "elapsed": elapsed, "rate": done / elapsed if elapsed else 0.0,
            "cpu_us": cpu / done * 1e6 if done else 0.0, "sessions": opened,
            "deferred": stats["deferred"], "bounced": stats["bounced"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=1024, help="message bytes")
    parser.add_argument("--connections", type=int, default=4,
                        help="concurrent connections to the sink (per-destination limit)")
    parser.add_argument("--per-connection", type=int, default=100,
                        help="messages carried by one connection before it is renewed")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds")
    parser.add_argument("--dir", default="/var/tmp", help="where the spool folder is made")
    args = parser.parse_args(argv)
    if not 0 < args.messages <= 1_000_000 or args.connections < 1 or args.time_limit <= 0:
        parser.error("--messages (1..1000000), --connections and --time-limit must be positive")

    # The sink is forked before this process makes any event loop.
    ours, theirs = multiprocessing.Pipe()
    sink = multiprocessing.get_context("fork").Process(target=_sink, args=(theirs,),
                                                       daemon=True)
    sink.start()
    directory = Path(tempfile.mkdtemp(prefix="sg-bench-delivery-", dir=args.dir))
    try:
        port = ours.recv()
        import uvloop

        fill_rate = uvloop.run(_fill(directory, args.messages, args.size))
        ours.send("cpu")
        sink_cpu = ours.recv()
        result = uvloop.run(_deliver(args, directory, port))
        ours.send("cpu")
        sink_cpu = ours.recv() - sink_cpu
    finally:
        ours.send("stop")
        sink.join(5)
        if sink.is_alive():
            sink.kill()
        shutil.rmtree(directory, ignore_errors=True)
    print(f"spool filled: {args.messages} messages of {args.size} B at {fill_rate:,.0f} msgs/s")
    print(f"delivered {result['delivered']:.0f} of {result['queued']:.0f} in "
          f"{result['elapsed']:.2f} s over {result['sessions']:.0f} connections "
          f"({args.connections} at a time, up to {args.per_connection} messages each); "
          f"deferred {result['deferred']:.0f}, bounced {result['bounced']:.0f}, "
          f"left {result['left']:.0f}")
    sink_us = sink_cpu / result["done"] * 1e6 if result["done"] else 0.0
    print(f"delivery rate: {result['rate']:,.0f} msgs/s, cpu/msg {result['cpu_us']:.0f} us "
          f"(sink: {sink_us:.0f} us, {sink_cpu / result['elapsed']:.0%} of a core)")
    return 0 if result["left"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
