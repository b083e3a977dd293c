"""Adapters named by requests: loaded off the generation loop, once per id however many requests ask
together, kept in an LRU cache bounded by a count and a memory budget, and checked against the rules of
per-request use.

Evicting an adapter only drops the cache's reference: sequences already running with it keep theirs, so an
eviction never disturbs a request in flight; the memory returns when the last of them finishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from gorgon.errors import GenerationError

log = logging.getLogger(__name__)


class AdapterRegistry:
    def __init__(
        self,
        load: Callable[[str, str, str | None], Any],
        max_entries: int = 16,
        max_bytes: int | None = None,
    ) -> None:
        """`load(adapter_id, source, api_token)` runs in a worker thread and returns the loaded adapter or
        raises ValueError with a sentence for the user. An adapter's size is its `nbytes` attribute (0 when
        it has none)."""
        self._load = load
        self._max = max_entries
        self._max_bytes = max_bytes
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._pinned: set[tuple[str, str]] = set()
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        self.loads = 0  # how many loads ran (tests check single loading)
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(_size(a) for a in self._cache.values())

    def __len__(self) -> int:
        return len(self._cache)

    def cached(self, adapter_id: str, source: str) -> bool:
        return (adapter_id, source) in self._cache

    async def get(self, adapter_id: str, source: str, api_token: str | None = None) -> Any:
        key = (adapter_id, source)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[key] = pending
            asyncio.get_running_loop().create_task(self._fill(key, api_token, pending))
        return await asyncio.shield(pending)

    def preload(self, adapter_id: str, source: str, api_token: str | None = None) -> Any:
        """Load now, in this thread, and keep loaded for good (`--preloaded-adapter-ids`, at start-up).
        Raises ValueError when the adapter cannot be used."""
        key = (adapter_id, source)
        if key not in self._cache:
            self.loads += 1
            self._cache[key] = self._load(adapter_id, source, api_token)
        self._pinned.add(key)
        self._evict(keep=key)
        return self._cache[key]

    async def _fill(self, key: tuple[str, str], api_token: str | None, future: asyncio.Future) -> None:
        try:
            self.loads += 1
            adapter = await asyncio.to_thread(self._load, key[0], key[1], api_token)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the request's error
            message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            shown = _shorten(key[0])
            message = message.replace(key[0], shown)  # a huge id is not echoed back whole
            log.warning("adapter %s could not be loaded: %s", shown, message)
            named = message if shown in message else f"adapter {shown!r}: {message}"
            future.set_exception(GenerationError(named))
            future.exception()  # mark retrieved: a failure with no waiter left is not an error
        else:
            self._cache[key] = adapter
            self._evict(keep=key)
            future.set_result(adapter)
        finally:
            del self._loading[key]

    def _evict(self, keep: tuple[str, str]) -> None:
        """Least recently used first, never a pinned adapter nor the one just loaded."""
        for key in list(self._cache):
            over_count = len(self._cache) > self._max
            over_bytes = self._max_bytes is not None and self.nbytes > self._max_bytes
            if not (over_count or over_bytes):
                return
            if key == keep or key in self._pinned:
                continue
            del self._cache[key]
            self.evictions += 1
            log.info("adapter %s evicted from the cache", key[0])


def _size(adapter: Any) -> int:
    return int(getattr(adapter, "nbytes", 0) or 0)


def _shorten(adapter_id: str, limit: int = 120) -> str:
    return (
        adapter_id if len(adapter_id) <= limit else f"{adapter_id[: limit - 20]}...({len(adapter_id)} chars)"
    )
