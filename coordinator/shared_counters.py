"""The coordinator's own client of the Redis counters, for ``inspect`` and ``reset``.

With ``[counters] backend = "redis"`` every host's counts are in Redis, so
support reads and resets them from any host without asking a worker. The
client follows the configuration in force: a reload that changes
``[counters]`` makes a new one (the workers pick a change up at restart).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cluster.settings import CounterSettings, Settings
from worker.counters.redis_store import RedisCounters, connect


class SharedCounters:
    def __init__(self, settings: Callable[[], Settings]) -> None:
        self._settings = settings
        self._client: RedisCounters | None = None
        self._made_for: tuple[CounterSettings, float] | None = None

    def enabled(self) -> bool:
        return self._settings().counters.backend == "redis"

    async def inspect(self, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
        return await (await self._current()).inspect(keys)

    async def reset(self, keys: list[str]) -> int:
        return await (await self._current()).reset(keys)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _current(self) -> RedisCounters:
        settings = self._settings()
        wanted = (settings.counters, settings.cluster.request_timeout)
        if self._client is None or self._made_for != wanted:
            await self.close()
            counters, timeout = wanted
            self._client = connect(counters.redis_url, counters.redis_cluster, timeout)
            self._made_for = wanted
        return self._client
