"""Adapters named by requests: loaded off the generation loop, once per id however many requests ask
together, kept in a small LRU cache, and checked against the rules of per-request use."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from gorgon.errors import GenerationError

log = logging.getLogger(__name__)


class AdapterRegistry:
    def __init__(self, load: Callable[[str, str, str | None], Any], max_entries: int = 16) -> None:
        """`load(adapter_id, source, api_token)` runs in a worker thread and returns the loaded adapter or
        raises ValueError with a sentence for the user."""
        self._load = load
        self._max = max_entries
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        self.loads = 0  # how many loads ran (tests check single loading)

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

    async def _fill(self, key: tuple[str, str], api_token: str | None, future: asyncio.Future) -> None:
        try:
            self.loads += 1
            adapter = await asyncio.to_thread(self._load, key[0], key[1], api_token)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the request's error
            message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            log.warning("adapter %s could not be loaded: %s", key[0], message)
            named = message if key[0] in message else f"adapter {key[0]!r}: {message}"
            future.set_exception(GenerationError(named))
            future.exception()  # mark retrieved: a failure with no waiter left is not an error
        else:
            self._cache[key] = adapter
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
            future.set_result(adapter)
        finally:
            del self._loading[key]
