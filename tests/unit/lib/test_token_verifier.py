"""TokenVerifier in-process: generated RSA keys, a JWKS source the test controls (and counts),
key rotation and its refetch, the refetch rate limit, which JWKs are trusted, and the Principal
built from the claims (scopes narrowing the role, the API key id)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from workbench.errors import Unauthorized
from workbench.identity.principal import ROLE_PERMISSIONS, Role
from workbench.identity.tokens import TokenVerifier, principal_from_claims

ISS = "xai-workbench"
AUD = "xai-workbench"
USER_ID = uuid.uuid4()
ORG_ID = uuid.uuid4()


@pytest.fixture(scope="module")
def old_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: rsa.RSAPrivateKey, kid: str, alg: str = "RS256") -> dict[str, Any]:
    """The public JWK as the user service publishes it."""
    data: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    data.update({"kid": kid, "alg": alg, "use": "sig"})
    return data


class Jwks:
    """A JWKS source whose key set the test changes and whose calls it counts."""

    def __init__(self, *keys: dict[str, Any]) -> None:
        self.keys = list(keys)
        self.times: list[float] = []

    @property
    def calls(self) -> int:
        return len(self.times)

    async def __call__(self) -> dict[str, Any]:
        self.times.append(time.monotonic())
        return {"keys": [dict(k) for k in self.keys]}


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    data: dict[str, Any] = {
        "iss": ISS, "aud": AUD, "sub": str(USER_ID), "org": str(ORG_ID), "role": "member",
        "typ": "access", "iat": now, "nbf": now, "exp": now + 300,
        "jti": uuid.uuid4().hex[:16], "sid": str(uuid.uuid4()),
    }
    data.update(changes)
    return data


def sign(key: rsa.RSAPrivateKey, kid: str, **changes: Any) -> str:
    return jwt.encode(claims(**changes), key, algorithm="RS256", headers={"kid": kid})


def verifier(source: Jwks, min_refresh_interval_s: float = 10.0) -> TokenVerifier:
    return TokenVerifier(source, issuer=ISS, audience=AUD,
                         min_refresh_interval_s=min_refresh_interval_s)


# ---- a valid token --------------------------------------------------------------------------


async def test_valid_token_verifies_into_the_principal_of_its_claims(
    old_key: rsa.RSAPrivateKey,
) -> None:
    source = Jwks(jwk(old_key, "old"))
    principal = await verifier(source).verify(sign(old_key, "old", sid="session-1"))
    assert principal.user_id == USER_ID
    assert principal.org_id == ORG_ID
    assert principal.role is Role.MEMBER
    assert principal.session_id == "session-1"
    assert principal.scopes is None and principal.key_id is None
    assert principal.permissions == ROLE_PERMISSIONS[Role.MEMBER]
    assert source.calls == 1


async def test_verifying_the_same_token_again_does_not_refetch_the_jwks(
    old_key: rsa.RSAPrivateKey,
) -> None:
    source = Jwks(jwk(old_key, "old"))
    v = verifier(source, min_refresh_interval_s=0)
    token = sign(old_key, "old", sid="s1")
    first = await v.verify(token)
    assert await v.verify(token) == first
    assert await v.verify(sign(old_key, "old", sid="s1")) == first  # another token, same key
    assert source.calls == 1


# ---- key rotation ---------------------------------------------------------------------------


async def test_token_of_a_new_kid_not_yet_cached_triggers_one_refetch_and_verifies(
    old_key: rsa.RSAPrivateKey, new_key: rsa.RSAPrivateKey,
) -> None:
    source = Jwks(jwk(old_key, "old"))
    v = verifier(source, min_refresh_interval_s=0)
    await v.verify(sign(old_key, "old"))
    assert source.calls == 1

    source.keys.append(jwk(new_key, "new"))  # the user service rotated its key
    principal = await v.verify(sign(new_key, "new"))
    assert principal.user_id == USER_ID
    assert source.calls == 2
    await v.verify(sign(new_key, "new"))  # the new kid is cached now
    assert source.calls == 2


async def test_concurrent_tokens_of_a_new_kid_share_one_refetch(
    old_key: rsa.RSAPrivateKey, new_key: rsa.RSAPrivateKey,
) -> None:
    source = Jwks(jwk(old_key, "old"), jwk(new_key, "new"))
    v = verifier(source)
    principals = await asyncio.gather(*(v.verify(sign(new_key, "new")) for _ in range(20)))
    assert {p.user_id for p in principals} == {USER_ID}
    assert source.calls == 1


async def test_token_signed_by_the_retired_but_still_published_key_verifies(
    old_key: rsa.RSAPrivateKey, new_key: rsa.RSAPrivateKey,
) -> None:
    # After rotation the JWKS lists the new active key and the retired one.
    source = Jwks(jwk(old_key, "old"), jwk(new_key, "new"))
    v = verifier(source)
    assert (await v.verify(sign(new_key, "new"))).user_id == USER_ID
    assert (await v.verify(sign(old_key, "old"))).user_id == USER_ID
    assert source.calls == 1


async def test_token_of_a_key_no_longer_published_is_refused_after_the_next_refresh(
    old_key: rsa.RSAPrivateKey, new_key: rsa.RSAPrivateKey,
) -> None:
    source = Jwks(jwk(old_key, "old"), jwk(new_key, "new"))
    v = verifier(source, min_refresh_interval_s=0)
    await v.verify(sign(old_key, "old"))
    source.keys = [jwk(new_key, "new")]  # the retired key's tokens have all expired
    await v.refresh(force=True)
    with pytest.raises(Unauthorized) as exc:
        await v.verify(sign(old_key, "old"))
    assert exc.value.code == "invalid_token"
    assert "unknown key" in exc.value.detail


# ---- the refetch rate limit -----------------------------------------------------------------


async def test_unknown_kids_arriving_together_share_one_refetch(
    old_key: rsa.RSAPrivateKey,
) -> None:
    source = Jwks(jwk(old_key, "old"))
    v = verifier(source, min_refresh_interval_s=0.2)
    await v.verify(sign(old_key, "old"))
    results = await asyncio.gather(*(v.verify(sign(old_key, f"unknown{i}")) for i in range(20)),
                                   return_exceptions=True)
    assert all(isinstance(r, Unauthorized) and r.code == "invalid_token" for r in results)
    assert source.calls == 2


async def test_refetches_for_unknown_kids_are_min_refresh_interval_apart(
    old_key: rsa.RSAPrivateKey,
) -> None:
    interval = 0.2
    source = Jwks(jwk(old_key, "old"))
    v = verifier(source, min_refresh_interval_s=interval)
    await v.verify(sign(old_key, "old"))
    for i in range(3):
        with pytest.raises(Unauthorized) as exc:
            await v.verify(sign(old_key, f"unknown{i}"))
        assert "unknown key" in exc.value.detail
    assert source.calls == 4
    gaps = [b - a for a, b in zip(source.times, source.times[1:], strict=False)]
    assert all(gap >= interval * 0.95 for gap in gaps), gaps


async def test_plain_refresh_within_the_min_refresh_interval_does_not_fetch(
    old_key: rsa.RSAPrivateKey,
) -> None:
    source = Jwks(jwk(old_key, "old"))
    v = verifier(source, min_refresh_interval_s=60)
    await v.refresh()
    await v.refresh()
    assert source.calls == 1
    await v.refresh(force=True)
    assert source.calls == 2


async def test_new_kid_within_the_min_refresh_interval_waits_for_the_next_fetch_and_verifies(
    old_key: rsa.RSAPrivateKey, new_key: rsa.RSAPrivateKey,
) -> None:
    interval = 0.3
    source = Jwks(jwk(old_key, "old"))
    v = verifier(source, min_refresh_interval_s=interval)
    await v.verify(sign(old_key, "old"))
    source.keys.append(jwk(new_key, "new"))
    assert (await v.verify(sign(new_key, "new"))).user_id == USER_ID
    assert source.calls == 2
    assert source.times[1] - source.times[0] >= interval * 0.95


async def test_unreachable_jwks_refuses_the_token_as_unauthorized(
    old_key: rsa.RSAPrivateKey,
) -> None:
    async def down() -> dict[str, Any]:
        raise ConnectionError("user service is down")

    v = TokenVerifier(down, issuer=ISS, audience=AUD)
    with pytest.raises(Unauthorized) as exc:
        await v.verify(sign(old_key, "old"))
    assert exc.value.status == 401


# ---- which JWKs are trusted -----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256", "HS256", "none"])
async def test_jwk_published_with_an_alg_other_than_rs256_is_ignored(
    old_key: rsa.RSAPrivateKey, new_key: rsa.RSAPrivateKey, alg: str,
) -> None:
    source = Jwks(jwk(old_key, "odd", alg=alg), jwk(new_key, "good"))
    v = verifier(source)
    with pytest.raises(Unauthorized) as exc:
        await v.verify(sign(old_key, "odd"))
    assert exc.value.code == "invalid_token"
    assert "unknown key" in exc.value.detail
    # The rest of the set is still trusted.
    assert (await v.verify(sign(new_key, "good"))).user_id == USER_ID


async def test_symmetric_jwk_in_the_set_is_ignored(new_key: rsa.RSAPrivateKey) -> None:
    secret = b"attacker-chosen-secret-0123456789"
    oct_jwk = {"kty": "oct", "kid": "hmac", "alg": "RS256", "use": "sig",
               "k": jwt.utils.base64url_encode(secret).decode()}
    source = Jwks(oct_jwk, jwk(new_key, "good"))
    v = verifier(source)
    forged = jwt.encode(claims(), secret, algorithm="HS256", headers={"kid": "hmac"})
    with pytest.raises(Unauthorized):
        await v.verify(forged)
    with pytest.raises(Unauthorized) as exc:
        await v.verify(sign(new_key, "hmac"))
    assert "unknown key" in exc.value.detail
    assert (await v.verify(sign(new_key, "good"))).user_id == USER_ID


# ---- the principal: scopes and API key id ---------------------------------------------------


async def test_principal_carries_the_scopes_and_api_key_id_of_the_token(
    old_key: rsa.RSAPrivateKey,
) -> None:
    v = verifier(Jwks(jwk(old_key, "old")))
    token = sign(old_key, "old", role="admin", scp=["projects:read", "kb:write"],
                 kid_api="key_abc123")
    principal = await v.verify(token)
    assert principal.scopes == frozenset({"projects:read", "kb:write"})
    assert principal.key_id == "key_abc123"
    assert principal.actor == "key:key_abc123"


def test_scopes_narrow_what_the_role_can_do() -> None:
    principal = principal_from_claims(claims(role="admin", scp=["projects:read", "org:delete"]))
    assert principal.can("projects:read")  # granted by role and scope
    assert not principal.can("projects:write")  # the role grants it, the scopes do not
    assert not principal.can("org:delete")  # a scope never adds what the role lacks
    assert principal.permissions == frozenset({"projects:read"})


def test_without_scopes_the_principal_can_everything_its_role_grants() -> None:
    principal = principal_from_claims(claims(role="admin"))
    assert principal.scopes is None
    assert all(principal.can(p) for p in ROLE_PERMISSIONS[Role.ADMIN])
    assert not principal.can("org:delete")


def test_empty_scope_list_grants_nothing() -> None:
    principal = principal_from_claims(claims(role="owner", scp=[]))
    assert principal.scopes == frozenset()
    assert not principal.can("projects:read")
