"""The emulator's web console (`/console`): server-rendered pages over the emulator's own REST surface.

The console is a client: every page is built from REST calls made in-process to the emulator's WSGI app
(`rest.Rest`), exactly as gcloud or google-cloud-bigquery would make them over HTTP. So Export starts an
export through the same code as `POST .../dicomStores/S:export`, and the console depends on nothing inside
the emulator but its public surface (plus one read-only look at which projects/locations hold datasets,
see `rest.healthcare_parents`: the REST surface has no projects.list/locations.list).

Hook (the only change outside this package): the emulator's dispatch sends every path that is `/console`
or starts with `/console/` to `handle(app, request)`, before authentication and version routing.
"""
from __future__ import annotations

import threading

from werkzeug.wrappers import Request, Response

_lock = threading.Lock()


def handle(app, request: Request) -> Response:
    """Answer one /console request for the emulator `app` (one Console per app, made on first use)."""
    console = getattr(app, "_web_console", None)
    if console is None:
        with _lock:
            console = getattr(app, "_web_console", None)
            if console is None:
                from .web import Console
                console = Console(app)
                app._web_console = console
    return console(request)
