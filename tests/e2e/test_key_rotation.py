"""Signing-key rotation: tokens signed by the retired key keep working until they expire, the
new key signs from now on, and the gateway accepts new-key tokens at once."""

from __future__ import annotations

import time

import httpx
import jwt

from tests.conftest import INTERNAL, Platform
from workbench.testing import login, register


def test_rotation_keeps_old_tokens_valid_and_new_tokens_accepted(
    distributed_platform: Platform,
) -> None:
    p = distributed_platform
    with p.client() as client:
        before = register(client)
        old_kid = jwt.get_unverified_header(before.access_token)["kid"]
        r = httpx.post(f"{p.user_url}/internal/v1/signing-keys/rotate",
                       headers={"x-wb-internal-token": INTERNAL})
        assert r.status_code == 200, r.text
        new_kid = r.json()["kid"]
        assert r.json()["previous_kid"] == old_kid and new_kid != old_kid

        deadline = time.monotonic() + 10
        after = login(client, before.email, before.password, user_id=before.user_id)
        while jwt.get_unverified_header(after.access_token)["kid"] != new_kid:
            assert time.monotonic() < deadline, "new key never used for signing"
            time.sleep(0.2)
            after = login(client, before.email, before.password, user_id=before.user_id)

        jwks = client.get("/.well-known/jwks.json").json()
        assert {old_kid, new_kid} <= {k["kid"] for k in jwks["keys"]}
        assert client.get("/api/v1/auth/me", headers=before.headers).status_code == 200
        me = client.get("/api/v1/auth/me", headers=after.headers)
        assert me.status_code == 200, me.text
        direct = httpx.get(f"{p.user_url}/api/v1/auth/me", headers=after.headers)
        assert direct.status_code == 200


def test_internal_rotation_needs_the_internal_token(distributed_platform: Platform) -> None:
    r = httpx.post(f"{distributed_platform.user_url}/internal/v1/signing-keys/rotate",
                   headers={"x-wb-internal-token": "guess"})
    assert r.status_code == 401
    assert r.json()["code"] == "internal_only"
