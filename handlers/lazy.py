"""once(): a value made on first use, once per instance (process), shared by every thread.

The functions create their clients lazily, so a cold start imports only what the first event needs.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def once(factory: Callable[[], T]) -> Callable[[], T]:
    """A function that returns factory()'s value, calling factory on the first call only (thread-safe)."""
    lock, made = threading.Lock(), []

    def get() -> T:
        if not made:
            with lock:
                if not made:
                    made.append(factory())
        return made[0]
    get.__doc__ = factory.__doc__
    return get
