"""The owner's side of counter requests: decide, replicate, then answer.

`OwnedKeys.decide` checks ownership and calls the shard in one synchronous
step, so ownership cannot change between the check and the count. What a
decision changed is sent to each key's replica, and only then answered:

- when the requester is itself the keys' replica (always so with two
  workers), the answer carries the keys' state and the requester applies
  it before it uses the answer: one round trip, not two;
- otherwise the changes of one loop iteration go to each replica in one
  ``Replicate`` (`Replicator`), and the answers wait for its ack.

Answers are remembered by request rid, so a resent request is answered
again without counting again. Requests arrive coalesced (every request one
node had for this one in a loop iteration, in one frame), and are read as
the plain lists they were decoded to (layouts in ``cluster.wire``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from cluster import wire
from cluster.counting import KEY, MAX, check_wire_ops
from cluster.wire import Status
from worker.counters.client import RESERVATION_TTL
from worker.counters.leases import LONGEST
from worker.counters.links import RingLinks
from worker.counters.shard import CounterShard

log = logging.getLogger(__name__)

# Owner-side memory of answered request rids: enough for every request that
# can still be resent within a request timeout at a few thousand per second.
_REPLY_CACHE = 16384

Reply = list[Any]  # [rid, status, epoch, value, detail, grant]
Change = tuple[list[str], list[str]]  # keys and reservation rids to replicate


class OwnedKeys:
    """Answers counter requests for the keys its node owns in the node's epoch."""

    def __init__(self, links: RingLinks, shard: CounterShard) -> None:
        self._links = links
        self._shard = shard
        self._replies: OrderedDict[str, Reply | asyncio.Future[Reply]] = OrderedDict()
        self.replicator = Replicator(links, shard)

    # -- a peer's frame ------------------------------------------------------------

    def on_request(self, ident: bytes, items: Any) -> None:
        if not isinstance(items, list):
            raise ValueError("counter request items must be a list")
        links = self._links
        requester = ident.decode(errors="replace")
        now: list[Reply] = []
        carried_keys: dict[str, None] = {}
        carried_rids: dict[str, None] = {}
        for item in items:
            if not isinstance(item, list) or len(item) != 6 or not isinstance(item[0], str):
                raise ValueError(f"malformed counter request item {item!r}")
            rid = item[0]
            known = self._replies.get(rid)
            if known is not None:
                if isinstance(known, list):
                    now.append(known)
                else:
                    known.add_done_callback(self._answer_later(ident))
                continue
            reply, change = self.decide(item)
            if change is None:
                now.append(reply)  # nothing changed: a repeat may be answered afresh
                continue
            keys, rids = change
            waits = []
            pushes: dict[str, list[str]] = {}
            to_requester = False
            for key in keys:
                replica = links.locate(key)[1]
                if replica is None or replica == links.name:
                    continue
                if replica == requester:
                    carried_keys[key] = None
                    to_requester = True
                else:
                    pushes.setdefault(replica, []).append(key)
            if to_requester:  # once per item: a renewal names many keys and rids
                carried_rids.update(dict.fromkeys(rids))
            for replica, names in pushes.items():
                waits.append(self.replicator.push(replica, names, rids))
            if not waits:
                self._remember(rid, reply)
                now.append(reply)
                continue
            answered = _after(waits, reply)
            self._remember(rid, answered)
            answered.add_done_callback(self._answered_later(ident, rid))
        if now or carried_keys:
            carried = self._shard.export(carried_keys, carried_rids) if carried_keys else None
            if not links.send_router(ident, wire.encode_counter_reply(now, carried)) and \
                    carried_keys:
                # The answer is lost (its queue is full): the replica still gets
                # the change, the other way (`Replicator`).
                self.replicator.push(requester, carried_keys, carried_rids)

    def _answered_later(self, ident: bytes, rid: str) -> Callable[[asyncio.Future[Reply]], None]:
        def answered(future: asyncio.Future[Reply]) -> None:
            reply = future.result()
            if self._replies.get(rid) is future:
                self._replies[rid] = reply
            self._answer(ident, [reply])
        return answered

    def _answer_later(self, ident: bytes) -> Callable[[asyncio.Future[Reply]], None]:
        return lambda future: self._answer(ident, [future.result()])

    def _answer(self, ident: bytes, replies: list[Reply]) -> None:
        self._links.send_router(ident, wire.encode_counter_reply(replies))

    def _remember(self, rid: str, reply: Reply | asyncio.Future[Reply]) -> None:
        self._replies[rid] = reply
        while len(self._replies) > _REPLY_CACHE:
            self._replies.popitem(last=False)

    # -- this node's own requests ----------------------------------------------------

    def apply(self, item: list[Any]) -> tuple[Reply, asyncio.Future[Reply] | None]:
        """Decide a request of this node's own now; the future (if any) resolves
        once its replicas hold the change: only then may the answer be used."""
        reply, change = self.decide(item, trusted=True)
        if change is None:
            return reply, None
        keys, rids = change
        pushes: dict[str, list[str]] = {}
        for key in keys:
            replica = self._links.locate(key)[1]
            if replica is not None and replica != self._links.name:
                pushes.setdefault(replica, []).append(key)
        if not pushes:
            return reply, None
        return reply, _after([self.replicator.push(r, names, rids)
                              for r, names in pushes.items()], reply)

    async def local(self, item: list[Any]) -> Reply:
        """`apply`, then wait for the replicas. (Never resent: its rid needs no
        place in the reply cache.)"""
        reply, wait = self.apply(item)
        if wait is not None:
            await asyncio.shield(wait)
        return reply

    # -- deciding --------------------------------------------------------------------

    def decide(self, item: list[Any], trusted: bool = False) -> tuple[Reply, Change | None]:
        """Answer from the shard if this node owns every key; no await in here,
        so ownership cannot change between the check and the count. The
        change is None when nothing was counted. `trusted`: built by this
        node from `Op`s, already checked."""
        links = self._links
        rid, _, kind, arg, ops, extra = item
        ring, epoch = links.ring, links.epoch
        if ring is None:
            return [rid, Status.RETRY, epoch, None, "no ring yet", None], None
        if kind in ("reset", "inspect"):
            if not isinstance(extra, list) or not all(isinstance(k, str) for k in extra):
                return [rid, Status.ERROR, epoch, None, f"{kind}: keys must be strings",
                        None], None
            keys = list(dict.fromkeys(extra))
        else:
            try:
                if not trusted:
                    check_wire_ops(ops)
            except ValueError as exc:
                return [rid, Status.ERROR, epoch, None, str(exc), None], None
            keys = list(dict.fromkeys(op[KEY] for op in ops))
        locate = links.locate
        for key in keys:
            if locate(key)[0] != links.name:
                return [rid, Status.MOVED, epoch, None, key, None], None
        if not links.active:
            prev = links.prev
            if prev is None or any(prev.owner(key) != links.name for key in keys):
                return [rid, Status.RETRY, epoch, None, "hand-off under way", None], None
        try:
            value, grant, rids = self._apply(kind, arg, ops, extra, keys)
        except (ValueError, TypeError) as exc:
            return [rid, Status.ERROR, epoch, None, str(exc), None], None
        reply = [rid, Status.OK, epoch, value, "", grant]
        return reply, (None if rids is None else (keys, rids))

    def _apply(self, kind: str, arg: Any, ops: list[Any], extra: Any,
               keys: list[str]) -> tuple[Any, Any, list[str] | None]:
        """(value, grant, reservation rids to replicate or None if nothing changed)."""
        shard = self._shard
        if kind == "check":
            return shard.check(ops).to_wire(), None, None
        if kind == "reserve":
            outcome = shard.reserve(_text(arg), ops, RESERVATION_TTL)
            if not outcome.ok:
                return outcome.to_wire(), None, None
            rids: list[str] = [arg]
            grants: list[list[Any]] | None = None
            if extra:
                grants = self._lend(ops, extra)
                rids += [ask[0] for ask in extra]
                if not all(grant[0] for grant in grants):
                    # All or none: the borrower decides alone only when every
                    # limited counter it has here is covered, so a part would
                    # only hold room.
                    for (lease_id, _, indices), grant in zip(extra, grants, strict=True):
                        if grant[0]:
                            shard.return_lease(lease_id, [int(grant[0])] * len(indices))
                            grant[0] = 0
            return outcome.to_wire(), grants, rids
        if kind == "renew":
            # Leases that ended with their bucket, spent from: each returned
            # and the next bucket's lent in one step (`CounterShard.renew`),
            # replicated once; each shape on its own, as they belong to
            # unrelated decisions.
            taken, renewed = shard.renew(self._renewals(ops, extra), RESERVATION_TTL, LONGEST)
            changed = taken + [ask[0] for ask, (units, _, _) in zip(extra, renewed, strict=True)
                               if units]
            return None, [[units, expires, list(counts)] for units, expires, counts in renewed], \
                (changed or None)
        if kind == "release":
            released = shard.release(_text(arg))
            return released, None, ([arg] if released else None)
        if kind == "add":
            return shard.add(ops).to_wire(), None, []
        if kind == "mark":
            shard.mark(ops)
            return None, None, []
        if kind == "return":
            returned = shard.return_lease(_text(arg), list(extra))
            return returned, None, ([arg] if returned else None)
        if kind == "reset":
            # Every record on these keys changed (and the reset's own, by its
            # id, is one of them): the replica gets them all.
            cleared = shard.reset(keys, _text(arg) or None)
            return cleared, None, shard.reservations_of(keys)
        if kind == "inspect":
            return {key: shard.rows(key) for key in keys}, None, None
        raise ValueError(f"unknown counter request kind {kind!r}")


    def _lend(self, ops: list[Any], asks: Any) -> list[list[Any]]:
        """`[units, expires, counts]` for each `[lease id, units wanted, op
        positions]` in `asks` (`CounterShard.lend`)."""
        if not isinstance(asks, list):
            raise ValueError("lease asks must be a list")
        grants = []
        for lease_id, want, indices in asks:
            if not isinstance(indices, list) or not indices or not all(
                    type(i) is int and 0 <= i < len(ops) for i in indices):
                raise ValueError(f"lease {lease_id!r}: bad op positions {indices!r}")
            part = [ops[i] for i in indices]
            if any(op[MAX] is None for op in part):
                raise ValueError("a lease is for limited counters only")
            units, expires, counts = self._shard.lend(_text(lease_id), part, int(want),
                                                      RESERVATION_TTL, LONGEST)
            grants.append([units, expires, list(counts)])
        return grants


    @staticmethod
    def _renewals(ops: list[Any], asks: Any) -> list[tuple[str, list[int], str, list[Any], int]]:
        """`(old lease id, unused, new lease id, ops, units wanted)` for each `[lease
        id, units wanted, op positions, old lease id, unused per position]` in
        `asks`, all checked before the shard changes anything."""
        if not isinstance(asks, list):
            raise ValueError("lease renewals must be a list")
        renewals = []
        for ask in asks:
            if not isinstance(ask, list) or len(ask) != 5:
                raise ValueError(f"malformed lease renewal {ask!r}")
            lease_id, want, indices, old_id, unused = ask
            if not isinstance(indices, list) or not indices or not all(
                    type(i) is int and 0 <= i < len(ops) for i in indices):
                raise ValueError(f"lease {lease_id!r}: bad op positions {indices!r}")
            if type(want) is not int or not isinstance(unused, list) or \
                    len(unused) != len(indices) or not all(type(n) is int for n in unused):
                raise ValueError(f"lease {lease_id!r}: bad units {want!r}, {unused!r}")
            renewals.append((_text(old_id), unused, _text(lease_id), [ops[i] for i in indices],
                             want))
        return renewals


class Replicator:
    """Sends what decisions changed to the keys' replicas: everything for one
    replica in one loop iteration goes in one ``Replicate``, and resolves one
    future when the replica acknowledged it (or could not be waited for)."""

    def __init__(self, links: RingLinks, shard: CounterShard) -> None:
        self._links = links
        self._shard = shard
        # replica -> (keys, rids, future) gathered in this loop iteration
        self._batches: dict[str, tuple[dict[str, None], dict[str, None],
                                       asyncio.Future[None]]] = {}
        self._acks: dict[str, tuple[str, asyncio.Future[None]]] = {}

    def push(self, replica: str, keys: Iterable[str], rids: Iterable[str]) -> asyncio.Future[None]:
        batch = self._batches.get(replica)
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._batches[replica] = ({}, {}, loop.create_future())
            loop.call_soon(self._flush, replica)
        batch[0].update(dict.fromkeys(keys))
        batch[1].update(dict.fromkeys(rids))
        return batch[2]

    def _flush(self, replica: str) -> None:
        keys, rids, done = self._batches.pop(replica)
        links = self._links
        peer = links.peers.get(replica)
        if peer is None:
            done.set_result(None)
            return
        # Exported now, after every change it covers and before any answer
        # it guards: the replica gets a state at least as new as each answer.
        data = self._shard.export(keys, rids)
        rid = links.rid()
        sent = links.send_router(replica.encode(),
                                 wire.encode(wire.Replicate(rid, links.epoch, data, True)))
        if not sent:
            # Not connected to us yet: through our own link, merged on arrival
            # (it may overtake or trail the ordered path).
            sent = peer.post(wire.encode(wire.Replicate(rid, links.epoch, data, False)))
        if not sent:
            done.set_result(None)
            return
        if peer.suspect:
            done.set_result(None)  # not waited for; its ack still clears the suspicion
        self._acks[rid] = (replica, done)
        # Half the request timeout, so a remote caller still gets the answer
        # in time when a replica is gone.
        asyncio.get_running_loop().call_later(links.request_timeout / 2, self._late, rid)

    def acked(self, rid: str) -> None:
        entry = self._acks.pop(rid, None)
        if entry is None:
            return
        replica, done = entry
        peer = self._links.peers.get(replica)
        if peer is not None:
            peer.suspect = False
        if not done.done():
            done.set_result(None)

    def _late(self, rid: str) -> None:
        entry = self._acks.pop(rid, None)
        if entry is None:
            return
        replica, done = entry
        peer = self._links.peers.get(replica)
        if peer is not None and not peer.suspect and not done.done():
            log.warning("counter node %s: replica %s did not acknowledge; answering "
                        "without waiting for it until it is heard from",
                        self._links.name, replica)
            peer.suspect = True
        if not done.done():
            done.set_result(None)


def _after(waits: list[asyncio.Future[None]], reply: Reply) -> asyncio.Future[Reply]:
    """A future of `reply` that resolves once every one of `waits` did."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[Reply] = loop.create_future()
    left = [len(waits)]

    def one(_: asyncio.Future[None]) -> None:
        left[0] -= 1
        if not left[0] and not answered.done():
            answered.set_result(reply)

    for wait in waits:
        wait.add_done_callback(one)
    return answered


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string id, got {value!r}")
    return value
