"""What one support change (a suspension, a country exception) costs the coordinator and a worker.

    .venv/bin/python -m loadtest.bench_snapshot [--domains 10000] [--dkim 1000] \
        [--geoip-mb 9] [--changes 20]

Builds a tenant directory of ``--domains`` domains (one account each; the
first ``--dkim`` of them signed, with a key file each) and a GeoIP database
padded to ``--geoip-mb`` MB (unreferenced bytes in its data section: the
readers and the wire treat it as a database of that size). Then, for
``--changes`` support changes (suspend one account after another), in this
one process and on CPU time (``time.process_time``):

- coordinator: ``SnapshotSources.set_support`` (builds the message) plus
  the publisher's encoding of the frame, and the frame's size;
- worker: the frame through a real ZeroMQ PUB/SUB pair over ipc:// (the
  receiving copy), ``wire.decode`` and what the worker does with it
  (``SnapshotFeed.offer``): the time its event loop is blocked.

Prints the median and maximum of each. No network beyond loopback ipc.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq

from cluster import wire
from cluster.dkimkeys import generate_key, key_path
from cluster.passwords import hash_password
from cluster.support_state import Suspension
from coordinator.snapshots import SnapshotPublisher, StateFile
from coordinator.sources import SnapshotSources
from loadtest.bench_core import write_config
from worker.link.snapshots import SnapshotFeed

METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"


def padded_geoip(source: Path, target: Path, megabytes: float) -> int:
    """A copy of ``source`` grown to ``megabytes``: zero bytes at the end of its data
    section, which no record points to, so every reader opens it as it is."""
    blob = source.read_bytes()
    cut = blob.rindex(METADATA_MARKER)
    pad = max(0, int(megabytes * 1024 * 1024) - len(blob))
    target.write_bytes(blob[:cut] + bytes(pad) + blob[cut:])
    return target.stat().st_size


def write_tenants(path: Path, keys_dir: Path, domains: int, signed: int) -> None:
    password = hash_password("bench-password")
    pem, _ = generate_key("ed25519")
    lines = []
    for n in range(domains):
        name = f"d{n:05d}.example"
        lines.append(f'[domains."{name}"]\ncountries = ["PL", "DE"]\n')
        if n < signed:
            lines.append('dkim_selector = "sg1"\n')
            key = key_path(keys_dir, name, "sg1")
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(pem)
        lines.append(f'[accounts."user@{name}"]\npassword = "{password}"\n')
    path.write_text("".join(lines))


class Capture:
    """Stands in for the coordinator's outbox: keeps the last frame published."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def publish(self, topic: bytes, frame: bytes) -> None:
        self.frames.append(frame)

    async def send(self, identity: bytes, frame: bytes) -> None:
        self.frames.append(frame)


class FirstFrame:
    """Stands in for the worker's line to the coordinator: answers with the first frame."""

    name = "bench"

    def __init__(self, frame: bytes) -> None:
        self.frame = frame

    async def send(self, message: wire.Message) -> None:
        pass

    async def receive(self) -> wire.Message:
        return wire.decode(self.frame)


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):8.2f}  max {max(values):8.2f}"


async def run(args: argparse.Namespace, folder: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    config = write_config(folder, 2525, "127.0.0.1:53", 2526, 1, folder / "spool")
    keys_dir = folder / "keys"
    geoip = folder / "geoip.mmdb"
    size = padded_geoip(root / "examples" / "GeoLite2-Country-example.mmdb", geoip,
                        args.geoip_mb)
    text = config.read_text().replace(
        str(root / "examples" / "GeoLite2-Country-example.mmdb"), str(geoip))
    config.write_text(text + f'\n[dkim]\nkeys_dir = "{keys_dir}"\n')
    started = time.monotonic()
    write_tenants(folder / "tenants.toml", keys_dir, args.domains, args.dkim)
    print(f"tenant directory: {args.domains} domains, {args.dkim} signed "
          f"({(folder / 'tenants.toml').stat().st_size / 1e6:.1f} MB of TOML, "
          f"written in {time.monotonic() - started:.1f} s); GeoIP {size / 1e6:.1f} MB")

    sources = SnapshotSources(config)
    outbox = Capture()
    publisher = SnapshotPublisher(sources, outbox, StateFile(folder), lambda: 1)  # type: ignore[arg-type]
    await publisher.publish()
    feed = SnapshotFeed(FirstFrame(outbox.frames[-1]))  # type: ignore[arg-type]
    await feed.first()

    context = zmq.Context()
    pub, sub = context.socket(zmq.PUB), context.socket(zmq.SUB)
    endpoint = f"ipc://{folder}/bench.sock"
    pub.bind(endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_SNAPSHOT)
    sub.connect(endpoint)
    time.sleep(0.3)  # the subscription reaches the PUB

    coordinator_ms, sizes, receive_ms, worker_ms = [], [], [], []
    for n in range(args.changes):
        support = sources.support.with_suspension(
            Suspension(f"user@d{n:05d}.example", "bench", "bench", time.time()))
        cpu = time.process_time()
        sources.set_support(support)
        await publisher.publish()
        coordinator_ms.append((time.process_time() - cpu) * 1000)
        frame = outbox.frames[-1]
        sizes.append(len(frame))

        pub.send_multipart([wire.TOPIC_SNAPSHOT, frame])
        if not sub.poll(10_000):
            raise SystemExit("the frame did not arrive through ZeroMQ")
        cpu = time.process_time()
        frames = sub.recv_multipart()
        receive_ms.append((time.process_time() - cpu) * 1000)
        cpu = time.process_time()
        message = wire.decode(frames[-1])
        feed.offer(message)  # type: ignore[arg-type]
        worker_ms.append((time.process_time() - cpu) * 1000)
        if feed.version != sources.version:
            raise SystemExit(f"the worker holds {feed.version}, not {sources.version}")
        account = f"user@d{n:05d}.example"
        if feed.current().support.suspension(account, time.time()) is None:
            raise SystemExit(f"{account} is not suspended on the worker")
    pub.close()
    sub.close()
    context.term()

    print(f"{args.changes} support changes, CPU ms per change:")
    print(f"  coordinator build+encode   {summary(coordinator_ms)}")
    print(f"  frame size (bytes)         median {statistics.median(sizes):12,.0f}")
    print(f"  worker receive (zmq copy)  {summary(receive_ms)}")
    print(f"  worker decode+apply        {summary(worker_ms)}")
    total = [a + b for a, b in zip(receive_ms, worker_ms, strict=True)]
    print(f"  worker loop blocked, total {summary(total)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", type=int, default=10_000)
    parser.add_argument("--dkim", type=int, default=1_000)
    parser.add_argument("--geoip-mb", type=float, default=9.0)
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sgsnap") as tmp:
        asyncio.run(run(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
