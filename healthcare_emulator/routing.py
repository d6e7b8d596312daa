"""The route table's machinery: (path template, method) -> handler, as fake-gcs-server's muxer.

A template is a resource path after the version prefix, with `{id}` segments (no `/` or `:`),
an optional `:verb` suffix, and optionally a trailing `{tail*}` that takes the rest of the path
(`/...` or nothing). The first template that matches wins; its ids are checked (400), then the
method is looked up (405 when the path exists but not with that method; 404 when no template
matches). A handler is `handler(app, call) -> Response`.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple

from werkzeug.wrappers import Request, Response

from .errors import ApiError
from .ids import check_ids

ANY = "*"  # a method key that takes every method (the handler dispatches on it itself)


class Call(NamedTuple):
    """One routed request."""
    request: Request
    version: str      # v1, v1beta1 or v1alpha2
    name: str         # the matched resource path, without its :verb and without the tail
    ids: tuple        # the template's ids, in path order (checked)
    tail: str         # what `{tail*}` took, without its leading "/" ("" when the template has none)


Handler = Callable[..., Response]


class Route(NamedTuple):
    template: str
    regex: re.Pattern
    name_format: str    # the template without its :verb and tail, ids as {}
    handlers: dict      # method (or ANY) -> handler
    has_tail: bool


_SEGMENT = re.compile(r"\{(\w+)(\*?)\}")


def _compile(template: str) -> tuple[re.Pattern, str, bool]:
    regex, name, pos, has_tail = [], [], 0, False
    for m in _SEGMENT.finditer(template):
        literal = template[pos:m.start()]
        regex.append(re.escape(literal))
        if m.group(2):  # {tail*}: must end the template
            if m.end() != len(template):
                raise ValueError(f"{template}: {{{m.group(1)}*}} must end the template")
            regex.append(r"(?:/(.*))?")
            name.append(literal)
            has_tail = True
        else:
            regex.append(r"([^/:]+)")
            name.append(literal + "{}")
        pos = m.end()
    if not has_tail:
        literal = template[pos:]
        regex.append(re.escape(literal))
        name.append(literal.split(":", 1)[0])  # a :verb is not part of the resource's name
    return re.compile("^" + "".join(regex) + "$"), "".join(name), has_tail


def route(template: str, **handlers: Handler) -> Route:
    """route("projects/{project}/.../{dataset}", GET=get, DELETE=delete); ANY=... takes every method."""
    regex, name_format, has_tail = _compile(template)
    return Route(template, regex, name_format, {(ANY if k == "ANY" else k): h for k, h in handlers.items()},
                 has_tail)


class RouteTable:
    def __init__(self, routes: list[Route]):
        self.routes = tuple(routes)

    def dispatch(self, app, request: Request, version: str, rest: str) -> Response:
        for r in self.routes:
            m = r.regex.match(rest)
            if m is not None:
                return self._call(r, m, app, request, version, rest)
        raise ApiError("NOT_FOUND", f"The requested URL /{version}/{rest} was not found on this server.")

    @staticmethod
    def _call(r: Route, m: re.Match, app, request: Request, version: str, rest: str) -> Response:
        groups = m.groups()
        ids, tail = (groups[:-1], groups[-1] or "") if r.has_tail else (groups, "")
        check_ids(*ids)
        handler = r.handlers.get(request.method) or r.handlers.get(ANY)
        if handler is None:
            raise ApiError("NOT_FOUND", f"Method {request.method} is not supported on /{version}/{rest}.", http=405)
        return handler(app, Call(request, version, r.name_format.format(*ids), ids, tail.strip("/")))
