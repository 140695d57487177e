"""The route table: which path prefix goes to which service, and which routes are public.
A new service plugs in with one line here."""

from __future__ import annotations

# (path prefix, service). Longest prefix wins.
ROUTE_TABLE: list[tuple[str, str]] = [
    ("/api/v1/auth", "user"),
    ("/api/v1/orgs", "user"),
    ("/api/v1/projects", "user"),
    ("/api/v1/api-keys", "user"),
    ("/.well-known/jwks.json", "user"),
]

# Routes that need no credentials (rate-limited per client IP instead).
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/refresh"),
    ("GET", "/.well-known/jwks.json"),
})

_SORTED = sorted(ROUTE_TABLE, key=lambda r: -len(r[0]))


def route_for(path: str) -> str | None:
    for prefix, service in _SORTED:
        if path == prefix or path.startswith(prefix + "/"):
            return service
    return None


def is_public(method: str, path: str) -> bool:
    return (method, path.rstrip("/") or "/") in PUBLIC_ROUTES
