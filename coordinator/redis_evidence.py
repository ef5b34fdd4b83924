"""Compromise evidence in Redis, added up across hosts (``[counters] backend = "redis"``).

With one host the coordinator keeps each account's evidence in memory
(:class:`~coordinator.evidence.EvidenceBook`). Hosts behind one load balancer
see different logins of one account, so with the Redis backend every
host's coordinator writes its workers' notes here instead, and a login
from a third country counts whichever hosts saw the first two.

Keys, per account, under the account's hash tag (one slot, one atomic
script per note), each expiring one window after its last note:

``sg:{acct:USER}:ev:countries``  hash, country -> ``"AT SID"`` (its last login)
``sg:{acct:USER}:ev:spam``       sorted set, ``"QUEUE_ID SID"`` scored by time,
    the last ``compromise.spam_messages`` kept
``sg:{acct:USER}:ev:claim``      set for a few seconds by the note that found a
    signal at its threshold: of hosts noting at the same moment, one makes
    the incident (the suspension itself is shared: see coordinator.support)

The script records the note and answers with what is in the window, from
which the incident is made exactly as from the book's own evidence.
Redis unreachable: the caller notes in its own book instead (this host's
evidence only), so detection goes on as on one host.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from cluster.settings import CompromiseSettings, Settings
from coordinator.evidence import LOGIN, Evidence, Incident, incident, parsed, view
from coordinator.state_store import StoreUnavailable
from worker.counters.redis_store import redis_client

MIN_TIMEOUT = 2.0      # nobody waits for a note: more patience than a decision's
CLAIM_MS = 10_000      # longer than a suspension takes to reach Redis

# KEYS: countries, spam, claim. ARGV: kind, detail, sid, at, now, window (s),
# spam kept, countries needed, spam needed (0: that signal is off).
_NOTE = """
local kind, detail, sid = ARGV[1], ARGV[2], ARGV[3]
local at, now, window = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ttl = math.ceil(window * 1000) + 1000
if kind == 'login' then
  local old = redis.call('HGET', KEYS[1], detail)
  if (not old) or tonumber(string.match(old, '^(%S+)')) <= at then
    redis.call('HSET', KEYS[1], detail, ARGV[4] .. ' ' .. sid)
  end
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('ZADD', KEYS[2], at, detail .. ' ' .. sid)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[7]) + 1))
  redis.call('PEXPIRE', KEYS[2], ttl)
end
local since = now - window
local countries = redis.call('HGETALL', KEYS[1])
local recent = 0
for i = 2, #countries, 2 do
  if tonumber(string.match(countries[i], '^(%S+)')) > since then recent = recent + 1 end
end
local spam = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. since, '+inf', 'WITHSCORES')
local due = (tonumber(ARGV[8]) > 0 and recent >= tonumber(ARGV[8]))
  or (tonumber(ARGV[9]) > 0 and #spam / 2 >= tonumber(ARGV[9]))
local claimed = 0
if due and redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[10]) then claimed = 1 end
return {claimed, countries, spam}
"""

_READ = """
return {redis.call('HGETALL', KEYS[1]), redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf',
        'WITHSCORES')}
"""


def evidence_keys(account: str) -> list[str]:
    base = "sg:{acct:" + account + "}:ev:"
    return [base + "countries", base + "spam", base + "claim"]


class SharedEvidence:
    def __init__(self, settings: Settings) -> None:
        counters = settings.counters
        self.timeout = max(MIN_TIMEOUT, settings.cluster.request_timeout)
        self._connect = lambda: redis_client(counters.redis_url, counters.redis_cluster,
                                             self.timeout)
        self._client: Any = None

    async def note(self, settings: CompromiseSettings, note: Any,
                   now: float) -> Incident | None:
        """Record one note (BadNote when malformed); the incident when this call claimed
        one. StoreUnavailable when Redis cannot be reached."""
        kind, account, detail, sid, at = parsed(note)
        at = min(at, now)
        if at <= now - settings.window:
            return None
        if not (settings.countries if kind == LOGIN else settings.spam_messages):
            return None
        claimed, countries, spam = await self._call(lambda r: r.eval(
            _NOTE, 3, *evidence_keys(account), kind, detail, sid, repr(at), repr(now),
            repr(float(settings.window)), settings.spam_messages, settings.countries,
            settings.spam_messages, CLAIM_MS))
        if not int(claimed):
            return None
        return incident(settings, account, _evidence(countries, spam), now, kind)

    async def evidence(self, settings: CompromiseSettings, account: str,
                       now: float) -> dict[str, Any]:
        """What counts now, in the form of :meth:`EvidenceBook.evidence`."""
        keys = evidence_keys(account)[:2]
        countries, spam = await self._call(lambda r: r.eval(
            _READ, 2, *keys, f"({now - settings.window!r}"))
        return view(settings, _evidence(countries, spam), now)

    async def forget(self, account: str) -> bool:
        """Support dealt with it: every host starts again from nothing."""
        return bool(await self._call(lambda r: r.delete(*evidence_keys(account))))

    async def unclaim(self, account: str) -> None:
        """The suspension is made (or was not needed): the next incident may be claimed."""
        await self._call(lambda r: r.delete(evidence_keys(account)[2]))

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _call(self, work: Any) -> Any:
        if self._client is None:
            self._client = self._connect()
        try:
            return await asyncio.wait_for(work(self._client), self.timeout)
        except TimeoutError:
            raise StoreUnavailable(f"redis did not answer within {self.timeout:g} s") from None
        except (RedisError, RedisClusterException, OSError) as exc:
            first = (str(exc) or type(exc).__name__).splitlines()[0]
            raise StoreUnavailable(f"redis: {first}") from None


def _evidence(countries: list[Any], spam: list[Any]) -> Evidence:
    found = Evidence()
    for i in range(0, len(countries), 2):
        at, _, sid = _text(countries[i + 1]).partition(" ")
        found.countries[_text(countries[i])] = (float(at), sid)
    for i in range(0, len(spam), 2):
        queue_id, _, sid = _text(spam[i]).partition(" ")
        found.spam.append((float(spam[i + 1]), queue_id, sid))
    found.spam.sort()
    return found


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
