"""FastAPI dependencies for identity, defined once: `PrincipalDep` and `require("kb:write")`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from workbench.errors import Forbidden, Unauthorized
from workbench.identity.principal import Principal
from workbench.identity.tokens import TokenVerifier


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def get_principal(request: Request) -> Principal:
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise Unauthorized("a bearer access token is required")
    verifier: TokenVerifier = request.app.state.verifier
    principal = await verifier.verify(token)
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(permission: str) -> Any:
    """`principal: Annotated[Principal, require("org:write")]` — 403 without the permission."""

    async def check(principal: PrincipalDep) -> Principal:
        if not principal.can(permission):
            raise Forbidden(
                f"this action needs the '{permission}' permission, which your role "
                f"'{principal.role}'" + (" and key scopes" if principal.scopes is not None else "")
                + " do not grant",
                code="permission_denied",
                extra={"permission": permission},
            )
        return principal

    return Depends(check)
