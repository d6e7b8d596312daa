"""Cloud Healthcare API adapter: DICOM store export and long-running operations, over REST.

Transport and auth: the shared session of transport.py, and the token source handlers/wiring.py passes
(`tokens`; none: no token, as a local emulator needs none).

Retries: 429, 5xx, connection errors and timeouts are retried with exponential backoff and full
jitter inside a time budget (an absolute `deadline`, time.monotonic()); past it TransientError is
raised, so the caller can let Pub/Sub redeliver. Any other 4xx raises ApiError at once (final).

`export` is not idempotent (a second call starts a second export), so it retries only answers
that prove nothing started (429, 503, a refused connection); after an ambiguous failure (500,
502, 504, a reset or a read timeout) it raises TransientError(ambiguous=True) for the caller to
look the operation up (see handlers/intake.py) instead of exporting twice.
"""
from __future__ import annotations

import random
import time
from typing import Any, Iterator

from . import logs
from . import transport as gh

Obj = dict[str, Any]

RETRYABLE_HTTP = frozenset({429, 500, 502, 503, 504})
NOT_STARTED_HTTP = frozenset({429, 503})  # the server refused before doing any work

# google.rpc.Code name -> number (googleapis google/rpc/code.proto)
RPC_CODES = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
             "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
             "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
             "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16}
HTTP_TO_RPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 10, 429: 8, 499: 1, 500: 13, 501: 12, 503: 14, 504: 4}


class ApiError(Exception):
    """A final answer from the API (a 4xx other than 429): retrying would not help."""

    def __init__(self, http_status: int, status: str, message: str, details: list[Any] | None = None):
        super().__init__(f"{http_status} {status}: {message}")
        self.http_status = http_status
        self.status = status
        self.message = message
        self.details = details or []
        self.code = RPC_CODES.get(status, HTTP_TO_RPC.get(http_status, 2))

    def rpc(self) -> Obj:
        """The error as google.rpc.Status {code, message}, as Operation.error carries it."""
        return {"code": self.code, "message": self.message}


class TransientError(Exception):
    """The API kept failing in a retryable way until the deadline."""

    def __init__(self, message: str, *, ambiguous: bool = False, attempts: int = 1):
        super().__init__(message)
        self.ambiguous = ambiguous  # True: a non-idempotent call may have taken effect
        self.attempts = attempts


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
              version: str | None = None, deadline: float | None = None,
              idempotent: bool = True, method_name: str = "", max_attempts: int | None = None) -> Obj:
        import requests

        deadline = deadline if deadline is not None else time.monotonic() + self.budget_s
        url = self.url(path, version)
        tokens = self.tokens()
        delay, attempt, ambiguous_seen = 0.2, 0, False
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransientError(f"{method_name}: no time left in the retry budget", ambiguous=ambiguous_seen,
                                     attempts=attempt - 1)
            timeout = (min(5.0, remaining), min(self.timeout_s, remaining))
            retry_after = None
            try:
                r = gh.request(method, url, tokens=tokens, json=body, params=params, timeout=timeout)
            except requests.exceptions.ConnectTimeout as e:
                problem, ambiguous = f"connect timeout ({type(e).__name__})", False
            except requests.exceptions.ConnectionError as e:
                problem, ambiguous = f"connection error ({_connection_reason(e)})", not _not_sent(e)
            except requests.exceptions.Timeout:
                problem, ambiguous = "read timeout", True
            except gh.TokenError as e:
                problem, ambiguous = f"no access token ({e})", False
            else:
                if 200 <= r.status_code < 300:
                    return r.json() if r.content else {}
                err = _error_of(r)
                if r.status_code not in RETRYABLE_HTTP:
                    raise err
                problem = f"{err.http_status} {err.status}: {err.message}"
                ambiguous = r.status_code not in NOT_STARTED_HTTP
                retry_after = _retry_after(r)
            ambiguous_seen = ambiguous_seen or ambiguous
            if max_attempts is not None and attempt >= max_attempts:  # the caller retries later (the poller)
                raise TransientError(f"{method_name}: {problem}", ambiguous=ambiguous_seen, attempts=attempt)
            if ambiguous and not idempotent:
                raise TransientError(f"{method_name}: {problem}", ambiguous=True, attempts=attempt)
            sleep = random.uniform(delay / 2, delay)  # exponential backoff, jittered
            if retry_after is not None:
                sleep = max(sleep, retry_after)
            delay = min(delay * 2, 10.0)
            if time.monotonic() + sleep >= deadline:
                raise TransientError(f"{method_name}: {problem} (gave up after {attempt} attempts)",
                                     ambiguous=ambiguous_seen, attempts=attempt)
            logs.warning(f"Healthcare API {method_name} failed transiently; retrying", attempt=attempt,
                         retryInS=round(sleep, 3), problem=problem)
            time.sleep(sleep)


def _error_of(r: Any) -> ApiError:
    try:
        e = r.json().get("error", {})
        if not isinstance(e, dict):
            raise ValueError
    except ValueError:
        e = {}
    status = e.get("status") if isinstance(e.get("status"), str) else None
    if status is None:
        status = {v: k for k, v in RPC_CODES.items()}.get(HTTP_TO_RPC.get(r.status_code, 2), "UNKNOWN")
    message: str = e["message"] if isinstance(e.get("message"), str) else (r.reason or f"HTTP {r.status_code}")
    details = e.get("details") if isinstance(e.get("details"), list) else []
    return ApiError(r.status_code, status, message[:2000], details)


def _retry_after(r: Any) -> float | None:
    try:
        return min(float(r.headers.get("Retry-After", "")), 30.0)
    except ValueError:
        return None


def _connection_reason(e: Any) -> str:
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return type(reason or (e.args[0] if e.args else e)).__name__


def _not_sent(e: Any) -> bool:
    """A connection that was never established: the request cannot have reached the server."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
    inner = e.args[0] if e.args else None
    reason = getattr(inner, "reason", inner)
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError))
