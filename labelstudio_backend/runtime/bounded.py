"""Bounded in-memory containers: every cache and set the backend keeps for the life of a process has a bound.

    cache = LRUCache(maxsize=8)                 # encoded images: least recently used dropped first
    failed = LRUCache(maxsize=10_000, ttl=600)  # entries also expire (a failed reference is tried again)
    projects = BoundedSet(maxsize=1_000)        # the least recently added or seen is dropped first

All are thread-safe. `ttl` is in seconds of `clock` (time.monotonic by default; tests pass a fake one).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

PROJECTS_MAX = 1_000  # per-project records a process keeps in memory (sync state, estimates, metrics, checks)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING = object()


class LRUCache(Generic[K, V]):
    """At most `maxsize` entries; the least recently used goes first; with `ttl`, entries expire too."""

    def __init__(self, maxsize: int, ttl: float | None = None, clock: Callable[[], float] = time.monotonic):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds or None, got {ttl}")
        self.maxsize = maxsize
        self.ttl = ttl
        self._clock = clock
        self._items: OrderedDict[K, tuple[V, float]] = OrderedDict()  # key -> (value, stored at)
        self._lock = threading.Lock()

    def get(self, key: K, default: Any = None) -> V | Any:
        with self._lock:
            value = self._live(key)
            if value is _MISSING:
                return default
            self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = (value, self._clock())
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def pop(self, key: K, default: Any = None) -> V | Any:
        with self._lock:
            value = self._live(key)
            self._items.pop(key, None)
            return default if value is _MISSING else value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return self._live(key) is not _MISSING

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def keys(self) -> list[K]:
        """A snapshot, oldest first."""
        with self._lock:
            self._expire()
            return list(self._items)

    def _live(self, key: Any) -> V | Any:
        entry = self._items.get(key)
        if entry is None:
            return _MISSING
        if self.ttl is not None and self._clock() - entry[1] >= self.ttl:
            del self._items[key]
            return _MISSING
        return entry[0]

    def _expire(self) -> None:
        if self.ttl is None:
            return
        now = self._clock()
        while self._items:
            key, (_, stored) = next(iter(self._items.items()))
            if now - stored < self.ttl:
                # Entries are in order of use, not of storing: an older entry may sit further on; it is
                # dropped when it is looked at or pushed out by the size bound.
                break
            del self._items[key]


class BoundedSet(Generic[K]):
    """A set of at most `maxsize` members; adding one more drops the least recently added or re-added."""

    def __init__(self, maxsize: int, ttl: float | None = None, clock: Callable[[], float] = time.monotonic):
        self._cache: LRUCache[K, bool] = LRUCache(maxsize, ttl, clock)

    @property
    def maxsize(self) -> int:
        return self._cache.maxsize

    def add(self, key: K) -> None:
        self._cache.put(key, True)

    def discard(self, key: K) -> None:
        self._cache.pop(key)

    def __contains__(self, key: object) -> bool:
        return key in self._cache

    def __len__(self) -> int:
        return len(self._cache)

    def __iter__(self) -> Iterator[K]:
        return iter(self._cache.keys())
