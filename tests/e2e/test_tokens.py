"""Forged and invalid access tokens are refused on `GET /api/v1/auth/me` — at the gateway in
both run modes, and by the user service itself when reached directly in distributed mode
(defense in depth: the services behind the gateway verify every token again).

Every forged token carries the claims of a real, registered user so that only the one property
under test differs; a positive control signed the same way with the real key is accepted."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from workbench.testing import ApiUser, register

ME = "/api/v1/auth/me"
PROBLEM_FIELDS = ("type", "title", "status", "detail", "request_id")
TARGETS = ("gateway-embedded", "gateway-distributed", "user-service-distributed")

# One attacker key for the whole module (RSA key generation is slow).
ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_KID = "attacker-key-1"


# ---- encoding helpers -----------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def rs256(claims: dict[str, Any], key: Any, kid: str, **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid, **headers})


def hs256_by_hand(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """PyJWT refuses to HMAC-sign with a PEM public key; an attacker does not."""
    signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}." \
                    f"{b64url_json(claims)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def unsigned(claims: dict[str, Any], kid: str) -> str:
    return f"{b64url_json({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{b64url_json(claims)}."


def flip_signature_byte(token: str) -> str:
    head, payload, sig = token.split(".")
    raw = bytearray(b64url_decode(sig))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{payload}.{b64url(bytes(raw))}"


# ---- the attacker's key server (records every hit) ------------------------------------------


@dataclass
class KeyServer:
    url: str
    hits: list[str]


@pytest.fixture(scope="module")
def attacker_key_server() -> Iterator[KeyServer]:
    """Serves a JWKS holding the attacker's key: were it ever fetched, the forgery would pass."""
    hits: list[str] = []
    jwk = json.loads(RSAAlgorithm.to_jwk(ATTACKER_KEY.public_key()))
    jwk.update({"kid": ATTACKER_KID, "alg": "RS256", "use": "sig"})
    body = json.dumps({"keys": [jwk]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        # The recorder works: a zero count later means "never fetched", not "never recorded".
        assert httpx.get(f"{url}/self-check", timeout=5).json() == {"keys": [jwk]}
        assert hits == ["/self-check"]
        hits.clear()
        yield KeyServer(url, hits)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---- where the tokens are sent --------------------------------------------------------------


@dataclass
class Target:
    """An endpoint that must refuse forged tokens, a real user of its platform, and the
    platform's active signing key."""

    name: str
    http: httpx.Client
    user: ApiUser
    kid: str
    private_key: Any

    def me(self, token: str) -> httpx.Response:
        return self.http.get(ME, headers={"authorization": f"Bearer {token}"})

    def claims(self, **changes: Any) -> dict[str, Any]:
        """Fresh, valid claims of the registered user (from its real token); `changes` set
        claims, a value of None removes one."""
        real = jwt.decode(self.user.access_token, options={"verify_signature": False})
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": real["iss"], "aud": real["aud"], "sub": real["sub"], "org": real["org"],
            "role": real["role"], "typ": "access", "iat": now, "nbf": now, "exp": now + 300,
            "jti": uuid.uuid4().hex[:16],
        }
        if "sid" in real:
            claims["sid"] = real["sid"]
        for name, value in changes.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def public_pem(self) -> bytes:
        """The real public key as an attacker gets it: from the published JWKS."""
        r = self.http.get("/.well-known/jwks.json")
        assert r.status_code == 200, r.text
        (jwk,) = [k for k in r.json()["keys"] if k["kid"] == self.kid]
        public = RSAAlgorithm.from_jwk(jwk)
        assert isinstance(public, rsa.RSAPublicKey)
        return public.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module", params=TARGETS)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """The gateway of each run mode, and the user service reached directly (distributed).
    One registered user per target serves the whole module: tokens differ per test (fresh
    iat/exp/jti), the account need not."""
    via, mode = request.param.rsplit("-", 1)
    platform = request.getfixturevalue(f"{mode}_platform")
    with platform.client() as gateway:
        user = register(gateway)
        kid, private_key = platform.active_signing_key()
        if via == "gateway":
            yield Target(request.param, gateway, user, kid, private_key)
            return
        assert platform.user_url is not None
        with platform.client() as direct:  # keeps the no-secrets-in-responses check
            direct.base_url = httpx.URL(platform.user_url)
            yield Target(request.param, direct, user, kid, private_key)


def assert_refused(r: httpx.Response, reason: str, code: str = "invalid_token") -> None:
    """401 problem+json with `code`; `reason` (a word of the detail) shows the token was refused
    for the property under test and not for some other flaw of the forgery."""
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    assert r.headers.get("www-authenticate", "").startswith("Bearer"), r.headers
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    for name in PROBLEM_FIELDS:
        assert body.get(name), f"problem lacks {name!r}: {body}"
    assert body["status"] == 401
    assert reason.lower() in body["detail"].lower(), body


# ---- the positive control -------------------------------------------------------------------


def test_token_signed_with_the_real_key_and_correct_claims_is_accepted(target: Target) -> None:
    r = target.me(rs256(target.claims(), target.private_key, target.kid))
    assert r.status_code == 200, r.text
    assert r.json()["user"]["id"] == target.user.user_id
    assert r.json()["org"]["id"] == target.user.org_id


# ---- forged signatures and algorithms -------------------------------------------------------


def test_unsigned_alg_none_token_is_refused(target: Target) -> None:
    assert_refused(target.me(unsigned(target.claims(), target.kid)), "algorithm")


def test_hs256_token_keyed_with_the_public_key_is_refused(target: Target) -> None:
    forged = hs256_by_hand(target.claims(), target.public_pem(), target.kid)
    assert_refused(target.me(forged), "algorithm")


def test_token_signed_by_another_rsa_key_under_the_real_kid_is_refused(target: Target) -> None:
    assert_refused(target.me(rs256(target.claims(), ATTACKER_KEY, target.kid)), "signature")


def test_real_token_with_one_flipped_signature_byte_is_refused(target: Target) -> None:
    assert target.me(target.user.access_token).status_code == 200
    assert_refused(target.me(flip_signature_byte(target.user.access_token)), "signature")


# ---- time, issuer, audience -----------------------------------------------------------------


def test_expired_token_is_refused_as_token_expired(target: Target) -> None:
    now = int(time.time())
    claims = target.claims(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    assert_refused(target.me(rs256(claims, target.private_key, target.kid)), "expired",
                   code="token_expired")


def test_token_not_valid_before_a_future_nbf_is_refused(target: Target) -> None:
    claims = target.claims(nbf=int(time.time()) + 3600)
    assert_refused(target.me(rs256(claims, target.private_key, target.kid)), "not valid yet")


def test_token_from_a_foreign_issuer_is_refused(target: Target) -> None:
    claims = target.claims(iss="https://attacker.example")
    assert_refused(target.me(rs256(claims, target.private_key, target.kid)), "issuer")


def test_token_for_a_foreign_audience_is_refused(target: Target) -> None:
    claims = target.claims(aud="some-other-app")
    assert_refused(target.me(rs256(claims, target.private_key, target.kid)), "audience")


# ---- key ids and key-location headers -------------------------------------------------------


def test_token_with_an_unknown_kid_is_refused(target: Target) -> None:
    # Signed with the real key: the key is chosen by kid, never by trying every key.
    token = rs256(target.claims(), target.private_key, f"unknown{uuid.uuid4().hex[:12]}")
    assert_refused(target.me(token), "unknown key")


def test_token_with_a_path_like_kid_is_refused(target: Target) -> None:
    token = rs256(target.claims(), target.private_key, "../../etc/passwd")
    assert_refused(target.me(token), "key id")


@pytest.mark.parametrize("header", ["jku", "x5u"])
def test_token_pointing_at_an_attacker_key_url_is_refused_and_the_url_never_fetched(
    target: Target, attacker_key_server: KeyServer, header: str
) -> None:
    before = len(attacker_key_server.hits)
    url = f"{attacker_key_server.url}/{target.name}/{header}/jwks.json"
    token = rs256(target.claims(), ATTACKER_KEY, ATTACKER_KID, **{header: url})
    assert_refused(target.me(token), "key-location")
    time.sleep(0.2)  # a fetch in the background would have landed by now
    assert attacker_key_server.hits[before:] == []


def test_token_embedding_its_own_verification_key_is_refused(target: Target) -> None:
    jwk = json.loads(RSAAlgorithm.to_jwk(ATTACKER_KEY.public_key()))
    token = rs256(target.claims(), ATTACKER_KEY, ATTACKER_KID, jwk=jwk)
    assert_refused(target.me(token), "key-location")


# ---- claims the token must carry ------------------------------------------------------------


def test_token_of_a_type_other_than_access_is_refused(target: Target) -> None:
    claims = target.claims(typ="refresh")
    assert_refused(target.me(rs256(claims, target.private_key, target.kid)), "access token")


def test_token_without_sub_is_refused(target: Target) -> None:
    claims = target.claims(sub=None)
    assert_refused(target.me(rs256(claims, target.private_key, target.kid)), "sub")
