"""The console's one entry point: the emulator's dispatch calls `handle` for every `/console` path."""
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
