"""Routes and the router: which handler answers a method and path, and which key it needs.

Paths are split on ``/`` the way TorchServe (Java's ``String.split``) splits them, so a trailing
slash never matters, on any route of any port. A pattern is segments: literals, ``{name}`` (one
non-empty segment) and, last, ``{name:path}`` (whatever is left, possibly nothing).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import MethodNotAllowed, NotFound, ServerError
from .request import Request
from .responses import Answer, ErrorRenderer, Streamed, torchserve_error

Handler = Callable[[Request], Answer | Streamed | Awaitable[Answer | Streamed]]


@dataclass(frozen=True, eq=False)
class Route:
    """One handler for some methods on one path pattern.

    ``key`` names the token the request must carry (None: open). A route that does not
    ``reads_body`` is answered as soon as its head is in, and its body is dropped as it arrives.
    ``errors`` renders this route's errors: the dialect of the protocol it belongs to.
    """

    pattern: str
    handler: Handler
    methods: frozenset[str] | None  # None: any method
    key: str | None
    reads_body: bool = True
    errors: ErrorRenderer = torchserve_error
    segments: tuple[str, ...] = field(init=False)
    # Each segment as (literal, parameter name, takes the rest): parsed once, matched per request.
    _compiled: tuple[tuple[str, str, bool], ...] = field(init=False)

    def __post_init__(self) -> None:
        segments = tuple(split_path(self.pattern))
        object.__setattr__(self, "segments", segments)
        object.__setattr__(self, "_compiled", tuple(_compile(segment) for segment in segments))
        if self.methods is not None and "GET" in self.methods:
            object.__setattr__(self, "methods", self.methods | {"HEAD"})

    def match(self, parts: Sequence[str]) -> dict[str, str] | None:
        params: dict[str, str] = {}
        count = len(parts)
        for i, (literal, name, rest) in enumerate(self._compiled):
            if rest:
                params[name] = "/".join(parts[i:])
                return params
            if i >= count:
                return None
            if name:
                if not parts[i]:
                    return None
                params[name] = parts[i]
            elif literal != parts[i]:
                return None
        return params if count == len(self._compiled) else None


def _compile(segment: str) -> tuple[str, str, bool]:
    if segment.startswith("{") and segment.endswith("}"):
        name, _, kind = segment[1:-1].partition(":")
        return "", name, kind == "path"
    return segment, "", False


def split_path(path: str) -> list[str]:
    """``/a/b/`` -> ``["a", "b"]``: Java's split, which drops trailing empty segments."""
    path = path.rstrip("/")
    if path.startswith("/"):
        path = path[1:]
    return path.split("/") if path else []


def methods(*names: str) -> frozenset[str]:
    return frozenset(names)


class Router:
    """The routes of one listener.

    Routes are grouped by their first segment, and a first segment belongs to the first table
    that has it: when the inference and management APIs share a port, ``/models`` is the
    management API's and ``/`` the inference API's, as TorchServe serves them.
    """

    def __init__(
        self, *tables: Iterable[Route], default_key: str | None, errors: ErrorRenderer = torchserve_error
    ) -> None:
        self._routes: dict[str, list[Route]] = {}
        for table in tables:
            claimed = set(self._routes)
            for route in table:
                first = route.segments[0] if route.segments else ""
                if first not in claimed:
                    self._routes.setdefault(first, []).append(route)
        self._not_found = Route("/", _raise(NotFound), None, default_key, reads_body=False, errors=errors)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for a request and its path parameters.

        A path no route has gets a route that answers 404 (after the listener's default key is
        checked, so an unknown path tells a client without a token nothing); a known path with
        another method gets one that answers 405, with the path's key.
        """
        parts = split_path(path)
        known: Route | None = None
        for route in self._routes.get(parts[0] if parts else "", ()):
            params = route.match(parts)
            if params is None:
                continue
            if route.methods is None or method in route.methods:
                return route, params
            known = known or route
        if known is None:
            return self._not_found, {}
        refusal = Route("/", _raise(MethodNotAllowed), None, known.key, reads_body=False, errors=known.errors)
        return refusal, {}


def _raise(error: Callable[[], ServerError]) -> Handler:
    def refuse(request: Request) -> Answer:
        raise error()

    return refuse
