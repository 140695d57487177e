"""Credentials: argon2id password hashes, API key strings and refresh-token hashes. Secrets are
high-entropy where we generate them, so a SHA-256 digest compared in constant time suffices for
keys and tokens; passwords are chosen by people and get argon2id."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import string

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

API_KEY_PREFIX = "wbk"
REFRESH_PREFIX = "wbr"
_ID_ALPHABET = string.ascii_lowercase + string.digits

class PasswordHashing:
    """argon2id. Parameters are settings (RFC 9106's low-memory choice by default); each hash
    records its own, so changing them never locks anyone out."""

    def __init__(self, time_cost: int = 3, memory_kib: int = 65536, parallelism: int = 4) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib,
                                      parallelism=parallelism)
        # Verified against when the account does not exist, so timing does not reveal which
        # emails are registered.
        self._dummy = self._hasher.hash("not-a-real-password-0000")

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        def check() -> bool:
            try:
                ok = self._hasher.verify(password_hash or self._dummy, password)
                return ok and bool(password_hash)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        return await asyncio.to_thread(check)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_api_key() -> tuple[str, str, bytes]:
    """Returns (key string shown once, public id, secret digest): `wbk_<id>_<secret>`."""
    public_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))
    secret = secrets.token_urlsafe(32)
    return f"{API_KEY_PREFIX}_{public_id}_{secret}", public_id, digest(secret)


def parse_api_key(key: str) -> tuple[str, str] | None:
    """(public id, secret) of a well-formed key, else None."""
    prefix, sep, rest = key.partition("_")
    if prefix != API_KEY_PREFIX or not sep:
        return None
    public_id, sep, secret = rest.partition("_")
    if not sep or len(public_id) != 16 or any(c not in _ID_ALPHABET for c in public_id):
        return None
    if not 20 <= len(secret) <= 100:
        return None
    return public_id, secret


def secret_matches(secret: str, stored_digest: bytes) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)


def new_refresh_token() -> tuple[str, bytes]:
    token = f"{REFRESH_PREFIX}_{secrets.token_urlsafe(32)}"
    return token, digest(token)
