"""Error types shared by the functions: what a caller retries, and what it does not."""
from __future__ import annotations


class Retryable(Exception):
    """The work may succeed later (Pub/Sub redelivers, or the next tick tries again)."""


class Permanent(Exception):
    """Retrying would not help."""


class ContentionError(Retryable):
    """A conditional write kept losing to concurrent writers (the caller lets Pub/Sub or the next tick retry)."""


class PublishError(Retryable):
    """An event could not be published (the caller lets Pub/Sub redeliver, or the next tick publishes it)."""
