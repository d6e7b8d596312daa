"""The one HTTP transport of the functions: every Google API they call (Healthcare, Firestore, Pub/Sub,
Cloud Storage) over REST, through urllib3's connection pools (one PoolManager per scheme and process), with
an access token.

Why REST and not Google's gRPC clients: importing google-cloud-firestore and google-cloud-pubsub
(gRPC, protobuf, api-core) costs more than a whole hello-world cold start. Why urllib3 and not requests:
requests is urllib3 plus what these calls never use (cookies, netrc and proxy lookup, charset detection,
idna), about a hundred more modules on every cold start. The four APIs need a few JSON calls each, so the
deployed functions depend on urllib3 (with certifi's CA bundle, as requests uses it) and google-auth only.
What requests did and the calls rely on is done here the same way: `json=` bodies, `params=` query
strings, gzip answers decoded, redirects followed, TLS verified against certifi's bundle (or
REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE), (connect, read) timeouts, and a failure named as requests named it
in the logs ("connection error (NewConnectionError)", "read timeout"...). Proxy variables (HTTPS_PROXY)
and .netrc are not read: the functions call Google's APIs directly.

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

import json
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import urlencode

from handlers.core.errors import Permanent, Retryable
from handlers.core.lazy import once

if TYPE_CHECKING:
    from urllib3 import BaseHTTPResponse, PoolManager

_dumps = json.dumps  # `send` takes a parameter named json, as requests' methods do

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


# -- the pools --------------------------------------------------------------------------------------------
_pool = {"size": 32}


def configure(*, concurrency: int) -> None:
    """Size the pools for `concurrency` calls at once (handlers/wiring.py, before the first call)."""
    _pool["size"] = max(32, concurrency + 8)


def _manager(**tls: Any) -> PoolManager:
    """Connections to up to 8 hosts, keeping enough per host for the poller's POLL_CONCURRENCY calls at once."""
    import urllib3
    return urllib3.PoolManager(num_pools=8, maxsize=_pool["size"], **tls)


@once
def _plain() -> PoolManager:
    """http:// (emulators, the metadata server): no CA bundle to load."""
    return _manager()


@once
def _tls() -> PoolManager:
    """https://, verified against certifi's bundle (REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE when set), as requests
    verified; the system's store if certifi is missing."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if not bundle:
        try:
            import certifi
            bundle = certifi.where()
        except ImportError:
            bundle = None
    return _manager(cert_reqs="CERT_REQUIRED", ca_certs=bundle)


def session(url: str) -> PoolManager:
    """The process's pool manager for `url`'s scheme."""
    return _tls() if url[:6].lower() == "https:" else _plain()


class Response:
    """An answer, read whole: what the adapters read of it (the names are those of requests.Response)."""
    __slots__ = ("status_code", "reason", "headers", "content")

    def __init__(self, r: BaseHTTPResponse):
        self.status_code: int = r.status
        self.reason: str = r.reason or ""
        self.headers: Mapping[str, str] = r.headers  # case-insensitive
        self.content: bytes = r.data

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.content)


_RETRIES: list[Any] = []


def _retries() -> Any:
    """urllib3 retries nothing itself (`call` is the one policy): a connection failure ends the attempt, and
    up to 30 redirects are followed (as requests did)."""
    if not _RETRIES:
        from urllib3.util.retry import Retry as U3Retry
        _RETRIES.append(U3Retry(total=None, connect=0, read=False, redirect=30, status=0, other=0))
    return _RETRIES[0]


def send(method: str, url: str, *, headers: Mapping[str, str] | None, timeout: Any, json: Any = None,
         data: bytes | str | None = None, params: Mapping[str, Any] | None = None) -> Response:
    """One HTTP exchange, as requests made it: `params` appended to the query (None values left out), `json`
    serialised as the body with its Content-Type, gzip answers decoded. `timeout`: seconds, or (connect, read).
    Raises urllib3's exceptions (see `failure`)."""
    import urllib3
    from urllib3.util.request import ACCEPT_ENCODING

    if params:
        pairs = [(k, v) for k, vs in params.items()
                 for v in (vs if isinstance(vs, (list, tuple)) else [vs]) if v is not None]
        if pairs:
            url = f"{url}{'&' if '?' in url else '?'}{urlencode(pairs, doseq=True)}"
    out = {"Accept": "*/*", "Accept-Encoding": ", ".join(ACCEPT_ENCODING.split(","))}
    out.update(headers or {})
    body: bytes | str | None = data
    if json is not None and not data:
        body = _dumps(json, allow_nan=False).encode("utf-8")
        if not any(k.lower() == "content-type" for k in out):
            out["Content-Type"] = "application/json"
    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    r = session(url).request(method, url, body=body, headers=out, timeout=urllib3.Timeout(connect=connect, read=read),
                             retries=_retries(), preload_content=True)
    return Response(r)


def failure(e: BaseException) -> tuple[str, str, bool] | None:
    """What a failed exchange was, named as requests named it: (requests' exception name, the reason, whether
    the request may have reached the server); None if `e` is no transport failure."""
    from urllib3 import exceptions as x

    if isinstance(e, x.MaxRetryError):  # the connection failed (or too many redirects)
        reason = e.reason
        if isinstance(reason, x.ResponseError):
            return "TooManyRedirects", "TooManyRedirects", True
        if isinstance(reason, x.ConnectTimeoutError) and not isinstance(reason, x.NewConnectionError):
            return "ConnectTimeout", "ConnectTimeout", False
        name = "SSLError" if isinstance(reason, x.SSLError) else "ConnectionError"
        not_sent = isinstance(reason, (x.NewConnectionError, x.ConnectTimeoutError))
        return name, type(reason or e).__name__, not not_sent
    if isinstance(e, x.ReadTimeoutError):
        return "ReadTimeout", "ReadTimeout", True
    if isinstance(e, (x.ProtocolError, OSError)):  # the connection broke after the request was sent
        return "ConnectionError", type(e).__name__, True
    if isinstance(e, x.HTTPError):
        return type(e).__name__, type(e).__name__, True
    return None


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
        problem = ""
        for attempt in range(4):
            if attempt:
                time.sleep(0.1 * 2 ** attempt)
            try:
                r = send("GET", self.url, params={"scopes": SCOPES}, headers={"Metadata-Flavor": "Google"},
                         timeout=(2.0, 5.0))
            except Exception as e:  # noqa: BLE001 - a transport failure (anything else is raised again)
                failed = failure(e)
                if failed is None:
                    raise
                problem = failed[0]
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

        try:
            if self._credentials is None:
                self._credentials, _ = google.auth.default(scopes=[SCOPES])
            if not self._credentials.valid or self._token is not None:
                self._credentials.refresh(_AuthRequest())
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


class _AuthResponse:
    """google.auth.transport.Response of an answer."""

    def __init__(self, r: Response):
        self.status, self.headers, self.data = r.status_code, r.headers, r.content


class _AuthRequest:
    """google.auth.transport.Request over these pools: google-auth's own token exchanges (an ADC refresh)."""

    def __call__(self, url: str, method: str = "GET", body: bytes | None = None, headers: Obj | None = None,
                 timeout: Any = 120, **kwargs: Any) -> _AuthResponse:
        from google.auth import exceptions
        try:
            return _AuthResponse(send(method, url, headers=headers, timeout=timeout or 120, data=body))
        except Exception as e:
            if failure(e) is None:
                raise
            raise exceptions.TransportError(e) from e  # type: ignore[no-untyped-call]


def cloud_tokens(*, metadata_host: str, on_google_cloud: bool, credentials_file: str | None) -> Tokens:
    """A token source for Google's own endpoints: the metadata server on Google Cloud without a key file,
    else Application Default Credentials (handlers/wiring.py makes one per process)."""
    return Metadata(metadata_host) if on_google_cloud and not credentials_file else Adc()


# -- calls -------------------------------------------------------------------------------------------------
def request(method: str, url: str, *, tokens: Tokens, timeout: Any, headers: Obj | None = None,
            **kw: Any) -> Response:
    """One HTTP exchange (`send`) with the token attached; a 401 refreshes a refreshable token and tries once
    more. Raises urllib3's exceptions and TokenError; returns the response whatever its status."""
    r = send(method, url, headers={**(headers or {}), **tokens.header()}, timeout=timeout, **kw)
    if r.status_code == 401 and tokens.refreshable:
        r = send(method, url, headers={**(headers or {}), **tokens.header(refresh=True)}, timeout=timeout, **kw)
    return r


def error_of(r: Response, kind: type[HttpError] = HttpError) -> HttpError:
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
         retry: Retry = Retry(), max_attempts: int | None = None, **kw: Any) -> Response:
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
             kw: Obj) -> tuple[Response | None, str, bool, float]:
    """One try: (the 2xx response, "", False, 0) or (None, the problem, whether the call may have taken
    effect, the least wait the server asked for). Raises HttpError for a final answer."""
    try:
        r = request(method, url, tokens=tokens, timeout=timeout, **kw)
    except TokenError as e:
        return None, f"no access token ({e})", False, 0.0
    except Exception as e:  # noqa: BLE001 - a transport failure (anything else is raised again)
        failed = failure(e)
        if failed is None:
            raise
        name, reason, sent = failed
        if name == "ConnectTimeout":
            return None, f"connect timeout ({name})", False, 0.0
        if name == "ReadTimeout":
            return None, "read timeout", True, 0.0
        if name in ("ConnectionError", "SSLError"):
            return None, f"connection error ({reason})", sent, 0.0
        return None, name, True, 0.0
    if 200 <= r.status_code < 300:
        return r, "", False, 0.0
    err = error_of(r, retry.final)
    if r.status_code not in retry.statuses and err.status not in retry.rpc_statuses:
        raise err
    wait = _retry_after(r) if retry.honour_retry_after else None
    return None, f"{err.http_status} {err.status}: {err.message}", r.status_code not in NOT_STARTED_HTTP, wait or 0.0


def _retry_after(r: Response) -> float | None:
    try:
        return min(float(r.headers.get("Retry-After", "")), 30.0)
    except ValueError:
        return None
