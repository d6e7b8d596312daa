"""Cloud Healthcare API adapter: DICOM store export and long-running operations, over REST.

Transport, auth, retries and errors are the shared transport's (transport.py): its session, the token
source handlers/wiring.py passes (`tokens`; none: no token, as a local emulator needs none), its one
retry policy with this API's numbers (429 and 5xx; Retry-After honoured; backoff from 0.2 s up to 10 s)
and its error types: ApiError is this API's transport.HttpError (a final answer, with its google.rpc code),
TransientError its transport.Unavailable (still failing at the deadline; `ambiguous` when a call that is
not idempotent may have taken effect); callers tell them from a Firestore or Pub/Sub failure.

`export` is not idempotent (a second call starts a second export), so it retries only answers
that prove nothing started (429, 503, a refused connection); after an ambiguous failure (500,
502, 504, a reset or a read timeout) it raises TransientError(ambiguous=True) for the caller to
look the operation up (see handlers/intake.py) instead of exporting twice.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

from . import logs
from . import transport as gh

Obj = dict[str, Any]
RETRYABLE_HTTP = frozenset({429, 500, 502, 503, 504})


class ApiError(gh.HttpError):
    """A final answer from the Healthcare API (a 4xx other than 429): retrying would not help."""


class TransientError(gh.Unavailable):
    """The Healthcare API kept failing in a retryable way until the deadline."""


def _log_retry(method_name: str) -> Any:
    def told(**fields: Any) -> None:
        logs.warning(f"Healthcare API {method_name} failed transiently; retrying", **fields)
    return told


class Healthcare:
    def __init__(self, endpoint: str, version: str = "v1", *, local: bool = False, timeout_s: float = 30.0,
                 budget_s: float = 30.0, tokens: gh.Tokens | None = None):
        self.endpoint = endpoint.rstrip("/")
        self.version = version
        self.local = local
        self.timeout_s = timeout_s
        self.budget_s = budget_s
        self._tokens = tokens or gh.Tokens()

    # -- API methods ----------------------------------------------------------------------------
    def export(self, store: str, body: Obj, *, version: str | None = None, deadline: float | None = None) -> Obj:
        """POST {store}:export -> Operation (not done)."""
        return self._call("POST", f"{store}:export", body, version=version, deadline=deadline, idempotent=False,
                          method_name="export")

    def get_operation(self, name: str, *, version: str | None = None, deadline: float | None = None,
                      max_attempts: int | None = None) -> Obj:
        return self._call("GET", name, None, version=version, deadline=deadline, method_name="operations.get",
                          max_attempts=max_attempts)

    def cancel_operation(self, name: str, *, version: str | None = None, deadline: float | None = None,
                         max_attempts: int | None = None) -> Obj:
        """Best effort: the operation later ends with error code 1 (CANCELLED)."""
        return self._call("POST", f"{name}:cancel", {}, version=version, deadline=deadline,
                          method_name="operations.cancel", max_attempts=max_attempts)

    def list_operations(self, dataset: str, *, filter: str | None = None, page_size: int | None = None,
                        page_token: str | None = None, version: str | None = None,
                        deadline: float | None = None) -> Obj:
        """One page: {"operations": [...], "nextPageToken": ...}."""
        params = {k: v for k, v in (("filter", filter), ("pageSize", page_size), ("pageToken", page_token)) if v}
        return self._call("GET", f"{dataset}/operations", None, params=params, version=version, deadline=deadline,
                          method_name="operations.list")

    def iter_operations(self, dataset: str, *, filter: str | None = None, page_size: int = 100,
                        max_pages: int = 50, version: str | None = None,
                        deadline: float | None = None) -> Iterator[Obj]:
        token = None
        for _ in range(max_pages):
            page = self.list_operations(dataset, filter=filter, page_size=page_size, page_token=token,
                                        version=version, deadline=deadline)
            yield from page.get("operations", [])
            token = page.get("nextPageToken")
            if not token:
                return
        raise TransientError(f"operations.list on {dataset}: more than {max_pages} pages", ambiguous=True)

    # -- transport ------------------------------------------------------------------------------
    def tokens(self) -> gh.Tokens:
        return self._tokens

    def url(self, path: str, version: str | None = None) -> str:
        return f"{self.endpoint}/{version or self.version}/{path.lstrip('/')}"

    def _call(self, method: str, path: str, body: Obj | None, *, params: Obj | None = None,
              version: str | None = None, deadline: float | None = None, idempotent: bool = True,
              method_name: str = "", max_attempts: int | None = None) -> Obj:
        retry = gh.Retry(statuses=RETRYABLE_HTTP, first_delay_s=0.2, max_delay_s=10.0, idempotent=idempotent,
                         honour_retry_after=True, on_retry=_log_retry(method_name), final=ApiError,
                         unavailable=TransientError)
        r = gh.call(method, self.url(path, version), tokens=self.tokens(), json=body, params=params,
                    deadline=deadline if deadline is not None else time.monotonic() + self.budget_s,
                    timeout_s=self.timeout_s, what=method_name, retry=retry, max_attempts=max_attempts)
        out: Obj = r.json() if r.content else {}
        return out
