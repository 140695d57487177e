"""Access-token verification against the user service's JWKS. Every rule is explicit: the
algorithm is pinned per key (never taken from the token), `kid` must be a plain identifier,
key-location headers (jku, x5u, jwk, x5c) are refused and never fetched."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import jwt
from jwt.algorithms import RSAAlgorithm

from workbench.errors import Unauthorized
from workbench.identity.principal import Principal, Role
from workbench.settings import AuthSettings

KID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ALLOWED_ALGS = frozenset({"RS256"})
FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c")

JwksSource = Callable[[], Awaitable[dict[str, Any]]]


def http_jwks_source(url: str, *, timeout: float = 3.0) -> JwksSource:
    async def fetch() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=timeout) as client:
            resp = await client.get(url)
            resp.raise_for_status()
            data: dict[str, Any] = resp.json()
            return data

    return fetch


class _Key:
    __slots__ = ("alg", "key")

    def __init__(self, alg: str, key: Any) -> None:
        self.alg, self.key = alg, key


class TokenVerifier:
    """Verifies access JWTs into Principals. Keys are cached by `kid`; an unknown `kid` triggers
    one JWKS refetch (at most once per `min_refresh_interval_s`), which is how rotation works."""

    def __init__(
        self,
        source: JwksSource,
        *,
        issuer: str,
        audience: str,
        leeway_s: int = 5,
        min_refresh_interval_s: float = 1.0,
        cache_size: int = 10_000,
    ) -> None:
        self._source = source
        self._issuer, self._audience, self._leeway = issuer, audience, leeway_s
        self._min_refresh = min_refresh_interval_s
        self._keys: dict[str, _Key] = {}
        self._fetched_at = -1e9
        self._lock = asyncio.Lock()
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._cache_size = cache_size

    async def refresh(self, *, force: bool = False, want_kid: str | None = None) -> None:
        """Refetch the JWKS. Fetches are at least `min_refresh_interval_s` apart, so tokens with
        made-up kids cannot hammer the user service; a caller looking for a kid waits for the
        next allowed fetch instead of failing (a freshly rotated key must work at once)."""
        asked = time.monotonic()
        async with self._lock:
            if want_kid is not None and (want_kid in self._keys or self._fetched_at >= asked):
                return  # a fetch happened while we waited for the lock: its answer stands
            wait = self._min_refresh - (time.monotonic() - self._fetched_at)
            if not force and wait > 0:
                if want_kid is None:
                    return
                await asyncio.sleep(wait)
            self._fetched_at = time.monotonic()
            jwks = await self._source()
            keys: dict[str, _Key] = {}
            for jwk in jwks.get("keys", []):
                kid, alg = jwk.get("kid"), jwk.get("alg")
                if not isinstance(kid, str) or not KID_RE.match(kid) or alg not in ALLOWED_ALGS:
                    continue
                if jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
                    continue
                keys[kid] = _Key(alg, RSAAlgorithm.from_jwk(jwk))
            self._keys = keys

    async def _key_for(self, kid: str) -> _Key:
        key = self._keys.get(kid)
        if key is None:
            try:
                await self.refresh(want_kid=kid)
            except Exception as exc:
                raise Unauthorized("signing keys are unavailable; try again") from exc
            key = self._keys.get(kid)
        if key is None:
            raise Unauthorized("token signed by an unknown key", code="invalid_token")
        return key

    async def verify(self, token: str) -> Principal:
        hit = self._cache.get(token)
        if hit is not None:
            exp, principal = hit
            if time.time() < exp:
                self._cache.move_to_end(token)
                return principal
            self._cache.pop(token, None)
        claims = await self.decode(token)
        principal = principal_from_claims(claims)
        self._cache[token] = (float(claims["exp"]), principal)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal

    async def decode(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized("malformed token", code="invalid_token") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALLOWED_ALGS:
            raise Unauthorized(f"token algorithm {alg!r} is not accepted", code="invalid_token")
        if any(h in header for h in FORBIDDEN_HEADERS):
            raise Unauthorized("token carries a key-location header", code="invalid_token")
        if not isinstance(kid, str) or not KID_RE.match(kid):
            raise Unauthorized("token has no valid key id", code="invalid_token")
        key = await self._key_for(kid)
        if key.alg != alg:
            raise Unauthorized("token algorithm does not match its key", code="invalid_token")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token has expired", code="token_expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthorized("token is not valid yet", code="invalid_token") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}", code="invalid_token") from exc
        if claims.get("typ") != "access":
            raise Unauthorized("not an access token", code="invalid_token")
        return claims


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    try:
        scopes = claims.get("scp")
        return Principal.build(
            user_id=uuid.UUID(str(claims["sub"])),
            org_id=uuid.UUID(str(claims["org"])),
            role=Role(claims["role"]),
            scopes=frozenset(scopes) if isinstance(scopes, list) else None,
            key_id=claims.get("kid_api"),
            session_id=claims.get("sid"),
        )
    except (KeyError, ValueError) as exc:
        raise Unauthorized("token claims are incomplete", code="invalid_token") from exc


def verifier_for_service(settings: AuthSettings, jwks: JwksSource | None = None) -> TokenVerifier:
    """The verifier of a service that checks the user service's tokens: keys from `jwks` (in
    process, embedded mode) or fetched from `settings.jwks_url`."""
    return TokenVerifier(jwks or http_jwks_source(settings.jwks_url),
                         issuer=settings.jwt_issuer, audience=settings.jwt_audience,
                         leeway_s=settings.jwt_leeway_s,
                         min_refresh_interval_s=settings.jwks_min_refresh_interval_s)
