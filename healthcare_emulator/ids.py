"""Resource ids: what a project, location or resource id may look like.

Ids are checked before anything touches state, so no client-chosen string ever reaches the filesystem.
"""
from __future__ import annotations

import re

from .errors import invalid

ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")
PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,127}$")
LOCATION_RE = re.compile(r"^[a-z0-9][a-z0-9\-]{0,62}$")
LABEL_KEY_RE = re.compile(r"^[\w\-]{1,63}$")
LABEL_VALUE_RE = re.compile(r"^[\w\-]{0,63}$")


def check_ids(project: str, location: str, *rest: str) -> None:
    """400 naming the first id that is not valid."""
    if not PROJECT_RE.match(project) or project in (".", ".."):
        raise invalid(f"Invalid project ID {project!r}.", "name")
    if not LOCATION_RE.match(location):
        raise invalid(f"Invalid location {location!r}.", "name")
    for r in rest:
        if not ID_RE.match(r) or r in (".", ".."):
            raise invalid(f"Invalid resource ID {r!r}: it must match [A-Za-z0-9_.-]{{1,256}}.", "name")


def parent_of(name: str) -> str:
    """projects/P/locations/L/datasets -> projects/P/locations/L (a collection's parent)."""
    return name.rsplit("/", 1)[0]
