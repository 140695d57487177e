"""The route table: which path prefix goes to which service, and which routes are public.
A new service plugs in with one line in ROUTE_TABLE."""

from __future__ import annotations

from collections.abc import Iterable

# (path prefix, service). Longest prefix wins.
ROUTE_TABLE: list[tuple[str, str]] = [
    ("/api/v1/auth", "user"),
    ("/api/v1/orgs", "user"),
    ("/api/v1/projects", "user"),
    ("/api/v1/api-keys", "user"),
    ("/.well-known/jwks.json", "user"),
    ("/api/v1/audit", "audit"),
    ("/api/v1/datasets", "data"),
    ("/api/v1/inference", "inference"),
    ("/api/v1/kb", "kb"),
    # The OpenAI-compatible API (the official clients call <base_url>/chat/completions, …).
    ("/v1", "inference"),
]

# Routes that take file bodies (regular expressions): their body limit is the gateway's
# upload_max_body_bytes instead of max_body_bytes.
UPLOAD_ROUTES: tuple[str, ...] = (
    r"^/api/v1/datasets/[^/]+/versions/?$",
    r"^/api/v1/datasets/[^/]+/uploads/[^/]+/?$",
    r"^/api/v1/kb/[^/]+/documents/?$",
)

# Routes that need no credentials (rate-limited per client IP instead).
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/refresh"),
    ("GET", "/.well-known/jwks.json"),
})


class RouteLabel:
    """Stands in for a framework route in the ASGI scope (its `path` labels metrics)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


class RouteTable:
    def __init__(self, entries: Iterable[tuple[str, str]] = ROUTE_TABLE,
                 public: frozenset[tuple[str, str]] = PUBLIC_ROUTES) -> None:
        self.entries = sorted(entries, key=lambda r: -len(r[0]))
        self.public = public

    def service_for(self, path: str) -> str | None:
        for prefix, service in self.entries:
            if path == prefix or path.startswith(prefix + "/"):
                return service
        return None

    def label_for(self, service: str, path: str) -> RouteLabel:
        for prefix, name in self.entries:
            if name == service and (path == prefix or path.startswith(prefix + "/")):
                return RouteLabel(prefix + "/*")
        return RouteLabel("unmatched")

    def is_public(self, method: str, path: str) -> bool:
        return (method, path.rstrip("/") or "/") in self.public


DEFAULT_ROUTES = RouteTable()


def route_for(path: str) -> str | None:
    return DEFAULT_ROUTES.service_for(path)

