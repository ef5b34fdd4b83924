"""The coordinator's own client of the Redis counters, for ``inspect`` and ``reset``.

With ``[counters] backend = "redis"`` every host's counts are in Redis, so
support reads and resets them from any host without asking a worker. Like
the workers, it keeps the ``[counters]`` it started with: a reload that
changes the section takes effect at the next start of the gateway.
"""

from __future__ import annotations

from typing import Any

from cluster.settings import Settings
from worker.counters.redis_store import RedisCounters, connect


class SharedCounters:
    def __init__(self, settings: Settings) -> None:
        self._counters = settings.counters
        self._timeout = settings.cluster.request_timeout
        self._client: RedisCounters | None = None

    def enabled(self) -> bool:
        return self._counters.backend == "redis"

    async def inspect(self, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
        return await self._current().inspect(keys)

    async def reset(self, keys: list[str]) -> int:
        return await self._current().reset(keys)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _current(self) -> RedisCounters:
        if self._client is None:  # connected on first use: Redis may be down at start
            self._client = connect(self._counters.redis_url, self._counters.redis_cluster,
                                   self._timeout)
        return self._client
