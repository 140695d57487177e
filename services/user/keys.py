"""The signing keyring: RSA keys with `kid`, the active one signs access tokens, retired ones
stay published in the JWKS until every token they signed has expired."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from datetime import timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.user.models import SigningKey
from workbench.db import Database, utcnow

ALG = "RS256"
log = logging.getLogger("services.user.keys")


def _generate(secret: bytes) -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = secrets.token_urlsafe(12).replace("-", "a").replace("_", "b")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(secret),
    )
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "alg": ALG, "use": "sig"})
    return SigningKey(kid=kid, private_pem=pem, public_jwk=jwk, created_at=utcnow())


class Keyring:
    """Signing and publishing never touch the database: a request's own transaction may hold
    the (SQLite) write lock. Keys are (re)loaded at start, after a rotation and periodically
    by `run_refresher`, so other replicas pick up a rotation too."""

    def __init__(self, db: Database, secret: bytes, *, access_ttl_s: int,
                 reload_interval_s: float = 30.0) -> None:
        self.db = db
        self.secret = secret
        self.access_ttl_s = access_ttl_s
        self.reload_interval_s = reload_interval_s
        self._active_kid: str | None = None
        self._private: Any = None
        self._jwks: dict[str, Any] = {"keys": []}
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Read keys from the database, creating the first one if there is none."""
        async with self._lock:
            async with self.db.transaction() as session:
                keys = await self._current_keys(session)
                if not any(k.retired_at is None for k in keys):
                    session.add(await asyncio.to_thread(_generate, self.secret))
                    await session.flush()
                    keys = await self._current_keys(session)
            self._install(keys)

    async def _current_keys(self, session: AsyncSession) -> list[SigningKey]:
        horizon = utcnow() - timedelta(seconds=self.access_ttl_s + 300)
        rows = (await session.execute(select(SigningKey).order_by(SigningKey.created_at))).scalars()
        return [k for k in rows if k.retired_at is None or k.retired_at > horizon]

    def _install(self, keys: list[SigningKey]) -> None:
        active = [k for k in keys if k.retired_at is None][-1]
        if active.kid != self._active_kid:
            self._private = serialization.load_pem_private_key(active.private_pem, self.secret)
            self._active_kid = active.kid
        self._jwks = {"keys": [dict(k.public_jwk) for k in keys]}
        self._loaded_at = time.monotonic()

    async def rotate(self, session: AsyncSession) -> tuple[str, str | None]:
        """Make a new active key; the old one is retired but stays in the JWKS."""
        previous: str | None = None
        for key in (await session.execute(
            select(SigningKey).where(SigningKey.retired_at.is_(None))
            .order_by(SigningKey.created_at)
        )).scalars():
            key.retired_at = utcnow()
            previous = key.kid
        new = await asyncio.to_thread(_generate, self.secret)
        session.add(new)
        await session.flush()
        return new.kid, previous

    async def run_refresher(self) -> None:
        """Background task of the service's lifespan."""
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                await self.load()
            except Exception as exc:  # keep signing with the keys we have
                log.warning("keyring reload failed: %s", exc)

    async def jwks(self) -> dict[str, Any]:
        return self._jwks

    async def sign(self, claims: dict[str, Any]) -> str:
        if self._private is None or self._active_kid is None:
            raise RuntimeError("keyring not loaded")
        return jwt.encode(claims, self._private, algorithm=ALG, headers={"kid": self._active_kid})
