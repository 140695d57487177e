"""Authenticates each request at the edge: access JWTs are verified against the user service's
JWKS; API keys are exchanged (once per cache lifetime) for a short-lived access token that
carries the key's scopes, so the services behind verify one kind of credential."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from dataclasses import dataclass

from workbench.client import ServiceClient, raise_for_problem
from workbench.errors import Unauthorized
from workbench.events.envelope import EventEnvelope
from workbench.identity.principal import Principal
from workbench.identity.tokens import TokenVerifier
from workbench.internal import INTERNAL_TOKEN_HEADER

API_KEY_PREFIX = "wbk_"
# wbk_<16 lower-case letters/digits>_<urlsafe secret>; anything else is refused without a call.
KEY_SHAPE = re.compile(r"wbk_[a-z0-9]{16}_[A-Za-z0-9_-]{20,100}")


@dataclass
class _Exchanged:
    principal: Principal
    token: str
    expires: float


class Authenticator:
    def __init__(self, verifier: TokenVerifier, user_client: ServiceClient, *,
                 internal_token: str, cache_ttl_s: float) -> None:
        self.verifier = verifier
        self.user_client = user_client
        self.internal_token = internal_token
        self.cache_ttl_s = cache_ttl_s
        self._keys: dict[str, _Exchanged] = {}  # by digest of the full key string
        self._by_public_id: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Future[_Exchanged]] = {}

    async def authenticate(self, credential: str) -> tuple[Principal, str | None]:
        """(principal, replacement bearer token or None when the credential is a JWT)."""
        if credential.startswith(API_KEY_PREFIX):
            ex = await self._exchange(credential)
            return ex.principal, ex.token
        return await self.verifier.verify(credential), None

    async def _exchange(self, key: str) -> _Exchanged:
        digest = hashlib.sha256(key.encode()).hexdigest()
        hit = self._keys.get(digest)
        now = time.time()
        if hit is not None and hit.expires > now:
            return hit
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_Exchanged] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = fut
        try:
            ex = await self._introspect(key)
            if self.cache_ttl_s > 0:
                self._keys[digest] = ex
                if ex.principal.key_id:
                    self._by_public_id[ex.principal.key_id] = digest
            fut.set_result(ex)
            return ex
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._inflight.pop(digest, None)

    async def _introspect(self, key: str) -> _Exchanged:
        if not KEY_SHAPE.fullmatch(key):
            raise Unauthorized("API key is not valid", code="invalid_api_key")
        resp = await self.user_client.post(
            "/internal/v1/api-keys/introspect", json={"key": key},
            headers={INTERNAL_TOKEN_HEADER: self.internal_token, "authorization": ""},
        )
        if resp.status_code == 401:
            body = resp.json() if resp.headers.get("content-type", "").endswith("json") else {}
            raise Unauthorized(str(body.get("detail") or "API key is not valid"),
                               code=str(body.get("code") or "invalid_api_key"))
        if resp.status_code == 422:
            raise Unauthorized("API key is not valid", code="invalid_api_key")
        raise_for_problem(resp)
        data = resp.json()
        token = str(data["access_token"])
        principal = await self.verifier.verify(token)
        ttl = min(float(data["expires_in"]) - 5, self.cache_ttl_s)
        return _Exchanged(principal, token, time.time() + max(ttl, 0))

    def forget_key(self, public_id: str) -> None:
        digest = self._by_public_id.pop(public_id, None)
        if digest:
            self._keys.pop(digest, None)

    def forget_where(self, org_id: uuid.UUID, user_id: uuid.UUID | None = None) -> None:
        for digest, ex in list(self._keys.items()):
            p = ex.principal
            if p.org_id == org_id and (user_id is None or p.user_id == user_id):
                self._keys.pop(digest, None)
                if p.key_id:
                    self._by_public_id.pop(p.key_id, None)

    async def on_event(self, event: EventEnvelope) -> None:
        """Revocations reach every gateway replica at once (broadcast subscription)."""
        data = event.data
        if event.type == "wb.user.api_key.revoked":
            self.forget_key(str(data.get("key_id", "")))
        elif event.type == "wb.user.org.deleted":
            self.forget_where(uuid.UUID(str(data["org_id"])))
        elif event.type in ("wb.user.member.removed", "wb.user.member.role_changed"):
            self.forget_where(uuid.UUID(str(data["org_id"])), uuid.UUID(str(data["user_id"])))
        elif event.type == "wb.user.signing_key.rotated":
            # Tokens signed by the new key may arrive before the throttled refetch would run.
            await self.verifier.refresh(force=True)
