"""Bounded containers (labelstudio_backend/runtime/bounded.py): size bounds, LRU order, expiry."""

from __future__ import annotations

import threading

import pytest

from labelstudio_backend.runtime.bounded import BoundedSet, LRUCache


def test_lru_drops_the_least_recently_used():
    cache = LRUCache(maxsize=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and cache.keys() == ["a", "c"] and len(cache) == 2
    assert cache.get("missing", "default") == "default"
    assert cache.pop("a") == 1 and "a" not in cache and cache.pop("a", 0) == 0


def test_lru_entries_expire():
    now = [0.0]
    cache = LRUCache(maxsize=10, ttl=600, clock=lambda: now[0])
    cache.put("failed-ref", True)
    now[0] = 599.0
    assert "failed-ref" in cache
    now[0] = 600.0
    assert "failed-ref" not in cache and len(cache) == 0
    cache.put("again", True)
    now[0] = 1300.0
    assert len(cache) == 0 and cache.keys() == []


def test_bounded_set_never_exceeds_its_bound_under_threads():
    projects = BoundedSet(maxsize=100)

    def add(start: int) -> None:
        for i in range(start, start + 5000):
            projects.add(i)

    threads = [threading.Thread(target=add, args=(n * 5000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(projects) == 100 and len(list(projects)) == 100
    projects.add(-1)
    assert -1 in projects
    projects.discard(-1)
    assert -1 not in projects


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="maxsize"):
        LRUCache(0)
    with pytest.raises(ValueError, match="ttl"):
        BoundedSet(5, ttl=0)
