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

`call` retries 408, 429, 5xx and connection failures with jittered exponential backoff until a
deadline; use it only for calls that are safe to repeat (reads, writes with a precondition, publishes
of events that carry their own id). Anything else raises HttpError at once.
"""
from __future__ import annotations

import random
import threading
import time
from typing import Any

from handlers.core.lazy import once

Obj = dict[str, Any]

SCOPES = "https://www.googleapis.com/auth/cloud-platform"
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})


class HttpError(Exception):
    """A final (non-retryable) answer, or the last answer before the deadline."""

    def __init__(self, http_status: int, status: str, message: str):
        super().__init__(f"{http_status} {status}: {message}")
        self.http_status, self.status, self.message = http_status, status, message


class Unavailable(Exception):
    """The API kept failing in a retryable way (or could not be reached) until the deadline."""


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


def error_of(r: Any) -> HttpError:
    """Google's error envelope {"error": {"code", "status", "message"}} (or what there is of it)."""
    try:
        e = r.json()
        e = e[0] if isinstance(e, list) and e else e
        e = e.get("error", {}) if isinstance(e, dict) else {}
    except ValueError:
        e = {}
    status = e.get("status") if isinstance(e.get("status"), str) else f"HTTP_{r.status_code}"
    message = e.get("message") if isinstance(e.get("message"), str) else (r.reason or "")
    return HttpError(r.status_code, status, message[:500])


def call(method: str, url: str, *, tokens: Tokens, deadline: float, what: str, timeout_s: float = 30.0,
         retry_statuses: frozenset[str] = frozenset(), **kw: Any) -> Any:
    """A call that is safe to repeat, retried until `deadline` (time.monotonic()). Returns the 2xx response.
    Raises HttpError for a final answer, Unavailable when out of time. `retry_statuses` adds retryable
    google.rpc status names (Firestore's ABORTED, for one)."""
    import requests

    delay = 0.05
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Unavailable(f"{what}: no time left to try")
        try:
            r = request(method, url, tokens=tokens, timeout=(min(5.0, remaining), min(timeout_s, remaining)), **kw)
        except requests.RequestException as e:
            problem = f"{type(e).__name__}"
        except TokenError as e:
            problem = str(e)
        else:
            if 200 <= r.status_code < 300:
                return r
            err = error_of(r)
            if r.status_code not in RETRYABLE and err.status not in retry_statuses:
                raise err
            problem = str(err)
        sleep = random.uniform(delay / 2, delay)
        delay = min(delay * 2, 5.0)
        if time.monotonic() + sleep >= deadline:
            raise Unavailable(f"{what}: {problem}")
        time.sleep(sleep)
