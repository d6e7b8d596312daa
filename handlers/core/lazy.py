"""once(): a value made on first use, once per instance (process), shared by every thread.

The functions create their clients lazily, so a cold start imports only what the first event needs.
`f.reset()` forgets the value (handlers/wiring.py, when tests point the adapters elsewhere).
"""
from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Once(Generic[T]):
    """factory()'s value, made on the first call only (thread-safe)."""

    def __init__(self, factory: Callable[[], T]):
        self.factory = factory
        self.lock = threading.Lock()
        self.made: list[T] = []
        self.__doc__ = factory.__doc__

    def __call__(self) -> T:
        if not self.made:
            with self.lock:
                if not self.made:
                    self.made.append(self.factory())
        return self.made[0]

    def reset(self) -> None:
        with self.lock:
            self.made.clear()


def once(factory: Callable[[], T]) -> Once[T]:
    """A function that returns factory()'s value, calling factory on the first call only (thread-safe)."""
    return Once(factory)
