"""The one HTTP transport of the functions: every Google API they call (Healthcare, Firestore, Pub/Sub,
Cloud Storage) over REST, through one pooled requests.Session per process, with an access token.

Why REST and not Google's gRPC clients: importing google-cloud-firestore and google-cloud-pubsub
(gRPC, protobuf, api-core) costs more than a whole hello-world cold start. The four APIs need a few
JSON calls each, so the deployed functions depend on requests and google-auth only.

Tokens (`Tokens`): on Google Cloud (Cloud Functions gen2 / Cloud Run set K_SERVICE) without a key file,
from the metadata server of the runtime's service account, cached until five minutes before it expires,
which is what google-auth's compute_engine credentials do; otherwise Application Default Credentials
through google-auth (imported only then). Emulators get no token (the Firestore emulator gets its
documented "owner" token, which lets batchWrite through). A 401 refreshes the token once and retries.

`call` is the one retry and backoff policy of every API call: 408 (unless `Retry` says otherwise), 429,
5xx and connection failures are retried with jittered exponential backoff until a deadline, past which
Unavailable is raised; any other answer raises HttpError at once (the one error type of a final answer,
with its google.rpc code). A call that is not idempotent (`Retry(idempotent=False)`: the Healthcare
export) is retried only after failures that prove nothing was sent or done; after an ambiguous one it
raises Unavailable(ambiguous=True), for the caller to look before it calls again.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from handlers.core.errors import Permanent, Retryable
from handlers.core.lazy import once

Obj = dict[str, Any]

SCOPES = "https://www.googleapis.com/auth/cloud-platform"
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
NOT_STARTED_HTTP = frozenset({429, 503})  # the server refused before doing any work
# google.rpc.Code name -> number (googleapis google/rpc/code.proto)
RPC_CODES = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
             "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
             "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
             "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16}
HTTP_TO_RPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 10, 429: 8, 499: 1, 500: 13, 501: 12, 503: 14, 504: 4}
RPC_NAMES = {v: k for k, v in RPC_CODES.items()}


class HttpError(Permanent):
    """A final answer from the API (not retryable), or the last answer before the deadline."""

    def __init__(self, http_status: int, status: str, message: str, details: list[Any] | None = None):
        super().__init__(f"{http_status} {status}: {message}")
        self.http_status, self.status, self.message = http_status, status, message
        self.details = details or []
        self.code = RPC_CODES.get(status, HTTP_TO_RPC.get(http_status, 2))

    def rpc(self) -> Obj:
        """The error as google.rpc.Status {code, message}, as Operation.error carries it."""
        return {"code": self.code, "message": self.message}


class Unavailable(Retryable):
    """The API kept failing in a retryable way (or could not be reached) until the deadline."""

    def __init__(self, message: str, *, ambiguous: bool = False, attempts: int = 1):
        super().__init__(message)
        self.ambiguous = ambiguous  # True: a call that is not idempotent may have taken effect
        self.attempts = attempts


@dataclass(frozen=True)
class Retry:
    """How `call` retries (one policy; the numbers differ per API)."""
    statuses: frozenset[int] = RETRYABLE            # HTTP statuses retried
    rpc_statuses: frozenset[str] = frozenset()      # google.rpc status names retried too (Firestore's ABORTED)
    first_delay_s: float = 0.05
    max_delay_s: float = 5.0
    idempotent: bool = True
    honour_retry_after: bool = False
    on_retry: Callable[..., None] | None = None     # told of each retry (attempt, retryInS, problem)
    # the error types raised: an API's own subclasses, so that a caller can tell its failures from another's
    final: type[HttpError] = HttpError
    unavailable: type[Unavailable] = Unavailable


class TokenError(Exception):
    """No access token could be obtained (the metadata server or the ADC refresh failed)."""


# -- the session -------------------------------------------------------------------------------------------
_pool = {"size": 32}


def configure(*, concurrency: int) -> None:
    """Size the session's pools for `concurrency` calls at once (handlers/wiring.py, before the first call)."""
    _pool["size"] = max(32, concurrency + 8)


@once
def session() -> Any:
    """The process's requests.Session, keeping enough connections per host for the poller's
    POLL_CONCURRENCY calls at once (requests keeps only 10 by default)."""
    import requests
    from requests.adapters import HTTPAdapter
    s = requests.Session()
    size = _pool["size"]
    for prefix in ("https://", "http://"):
        s.mount(prefix, HTTPAdapter(pool_connections=8, pool_maxsize=size))
    return s


# -- tokens ------------------------------------------------------------------------------------------------
class Tokens:
    """No token (an emulator that needs none)."""
    refreshable = False

    def header(self, *, refresh: bool = False) -> Obj:
        return {}


class Static(Tokens):
    def __init__(self, token: str):
        self._header = {"Authorization": f"Bearer {token}"}

    def header(self, *, refresh: bool = False) -> Obj:
        return self._header


class _Cached(Tokens):
    refreshable = True
    MARGIN_S = 300.0  # refresh this long before expiry

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires = 0.0

    def header(self, *, refresh: bool = False) -> Obj:
        with self._lock:
            if refresh or self._token is None or time.monotonic() >= self._expires - self.MARGIN_S:
                self._token, lifetime = self._fetch()
                self._expires = time.monotonic() + lifetime
            return {"Authorization": f"Bearer {self._token}"}

    def _fetch(self) -> tuple[str, float]:
        raise NotImplementedError


class Metadata(_Cached):
    """The runtime service account's token from the metadata server (GCE_METADATA_HOST overrides the host,
    as it does for google-auth)."""

    def __init__(self, host: str):
        super().__init__()
        self.url = f"http://{host}/computeMetadata/v1/instance/service-accounts/default/token"

    def _fetch(self) -> tuple[str, float]:
        import requests

        problem = ""
        for attempt in range(4):
            if attempt:
                time.sleep(0.1 * 2 ** attempt)
            try:
                r = session().get(self.url, params={"scopes": SCOPES}, headers={"Metadata-Flavor": "Google"},
                                  timeout=(2.0, 5.0))
            except requests.RequestException as e:
                problem = type(e).__name__
                continue
            if r.status_code == 200:
                try:
                    body = r.json()
                    return str(body["access_token"]), float(body.get("expires_in") or 0)
                except (ValueError, KeyError, TypeError):
                    problem = "an unreadable token response"
                    continue
            problem = f"HTTP {r.status_code}"
            if r.status_code not in RETRYABLE:
                break
        raise TokenError(f"the metadata server gave no access token ({problem})")


class Adc(_Cached):
    """Application Default Credentials (a key or user credentials file, gcloud's ADC) via google-auth."""

    def __init__(self) -> None:
        super().__init__()
        self._credentials: Any = None

    def _fetch(self) -> tuple[str, float]:
        import google.auth
        from google.auth import exceptions
        from google.auth.transport.requests import Request

        try:
            if self._credentials is None:
                self._credentials, _ = google.auth.default(scopes=[SCOPES])
            if not self._credentials.valid or self._token is not None:
                self._credentials.refresh(Request(session()))
        except exceptions.GoogleAuthError as e:
            raise TokenError(f"Application Default Credentials gave no access token ({type(e).__name__})") from None
        expiry = getattr(self._credentials, "expiry", None)
        if expiry is None:
            lifetime = 3600.0
        else:
            from datetime import datetime, timezone
            now = datetime.now(timezone.utc).replace(tzinfo=None)  # google-auth keeps naive UTC expiries
            lifetime = (expiry - now).total_seconds()
        return self._credentials.token, max(lifetime, self.MARGIN_S + 1.0)


def cloud_tokens(*, metadata_host: str, on_google_cloud: bool, credentials_file: str | None) -> Tokens:
    """A token source for Google's own endpoints: the metadata server on Google Cloud without a key file,
    else Application Default Credentials (handlers/wiring.py makes one per process)."""
    return Metadata(metadata_host) if on_google_cloud and not credentials_file else Adc()


# -- calls -------------------------------------------------------------------------------------------------
def request(method: str, url: str, *, tokens: Tokens, timeout: Any, headers: Obj | None = None, **kw: Any) -> Any:
    """One HTTP exchange with the token attached; a 401 refreshes a refreshable token and tries once more.
    Raises requests' exceptions and TokenError; returns the response whatever its status."""
    r = session().request(method, url, headers={**(headers or {}), **tokens.header()}, timeout=timeout, **kw)
    if r.status_code == 401 and tokens.refreshable:
        r = session().request(method, url, headers={**(headers or {}), **tokens.header(refresh=True)},
                              timeout=timeout, **kw)
    return r


def error_of(r: Any, kind: type[HttpError] = HttpError) -> HttpError:
    """Google's error envelope {"error": {"code", "status", "message", "details"}} (or what there is of it)."""
    try:
        e = r.json()
        e = e[0] if isinstance(e, list) and e else e
        e = e.get("error", {}) if isinstance(e, dict) else {}
        e = e if isinstance(e, dict) else {}
    except ValueError:
        e = {}
    status = e["status"] if isinstance(e.get("status"), str) else RPC_NAMES.get(HTTP_TO_RPC.get(r.status_code, 2),
                                                                                 "UNKNOWN")
    message: str = e["message"] if isinstance(e.get("message"), str) else (r.reason or f"HTTP {r.status_code}")
    details = e["details"] if isinstance(e.get("details"), list) else []
    return kind(r.status_code, status, message[:2000], details)


def call(method: str, url: str, *, tokens: Tokens, deadline: float, what: str, timeout_s: float = 30.0,
         retry: Retry = Retry(), max_attempts: int | None = None, **kw: Any) -> Any:
    """A call retried by `retry` until `deadline` (time.monotonic()) or `max_attempts`. Returns the 2xx
    response. Raises HttpError for a final answer, Unavailable when out of time or attempts (or at once
    after an ambiguous failure of a call that is not idempotent)."""
    delay, attempt, ambiguous_seen = retry.first_delay_s, 0, False
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise retry.unavailable(f"{what}: no time left to try", ambiguous=ambiguous_seen, attempts=attempt - 1)
        r, problem, ambiguous, wait = _attempt(method, url, tokens, (min(5.0, remaining), min(timeout_s, remaining)),
                                               retry, kw)
        if r is not None:
            return r
        ambiguous_seen = ambiguous_seen or ambiguous
        if max_attempts is not None and attempt >= max_attempts:  # the caller retries later (the poller)
            raise retry.unavailable(f"{what}: {problem}", ambiguous=ambiguous_seen, attempts=attempt)
        if ambiguous and not retry.idempotent:
            raise retry.unavailable(f"{what}: {problem}", ambiguous=True, attempts=attempt)
        sleep = max(random.uniform(delay / 2, delay), wait)  # exponential backoff, jittered
        delay = min(delay * 2, retry.max_delay_s)
        if time.monotonic() + sleep >= deadline:
            raise retry.unavailable(f"{what}: {problem} (gave up after {attempt} attempts)",
                                    ambiguous=ambiguous_seen, attempts=attempt)
        if retry.on_retry is not None:
            retry.on_retry(attempt=attempt, retryInS=round(sleep, 3), problem=problem)
        time.sleep(sleep)


def _attempt(method: str, url: str, tokens: Tokens, timeout: tuple[float, float], retry: Retry,
             kw: Obj) -> tuple[Any, str, bool, float]:
    """One try: (the 2xx response, "", False, 0) or (None, the problem, whether the call may have taken
    effect, the least wait the server asked for). Raises HttpError for a final answer."""
    import requests

    try:
        r = request(method, url, tokens=tokens, timeout=timeout, **kw)
    except requests.exceptions.ConnectTimeout as e:
        return None, f"connect timeout ({type(e).__name__})", False, 0.0
    except requests.exceptions.ConnectionError as e:
        return None, f"connection error ({_connection_reason(e)})", not _not_sent(e), 0.0
    except requests.exceptions.Timeout:
        return None, "read timeout", True, 0.0
    except requests.RequestException as e:
        return None, type(e).__name__, True, 0.0
    except TokenError as e:
        return None, f"no access token ({e})", False, 0.0
    if 200 <= r.status_code < 300:
        return r, "", False, 0.0
    err = error_of(r, retry.final)
    if r.status_code not in retry.statuses and err.status not in retry.rpc_statuses:
        raise err
    wait = _retry_after(r) if retry.honour_retry_after else None
    return None, f"{err.http_status} {err.status}: {err.message}", r.status_code not in NOT_STARTED_HTTP, wait or 0.0


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
