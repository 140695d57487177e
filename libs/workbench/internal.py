"""Service-to-service routes (`/internal/...`): never routed by the gateway, and guarded by the
deployment's internal token so a caller inside the network still has to prove itself."""

from __future__ import annotations

import hmac
import uuid
from typing import Annotated

from fastapi import Depends, Header, Request

from workbench.errors import BadRequest, Unauthorized
from workbench.identity.principal import Principal, Role

INTERNAL_TOKEN_HEADER = "x-wb-internal-token"


async def _require_internal(
    request: Request,
    x_wb_internal_token: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    expected: str = request.app.state.settings.internal_token.get_secret_value()
    if not x_wb_internal_token or not hmac.compare_digest(
        x_wb_internal_token.encode(), expected.encode()
    ):
        raise Unauthorized("internal route: a valid internal token is required",
                           code="internal_only")


InternalDep = Depends(_require_internal)


# The header naming the user another service acts for on an internal route.
ON_BEHALF_HEADER = "x-wb-on-behalf-of"


def principal_on_behalf(org_id: uuid.UUID, user: str | None, role: Role) -> Principal:
    """Who an internal call acts as: the org in its path, the user its caller names (or none:
    the nil id), with `role`'s permissions."""
    try:
        user_id = uuid.UUID(user) if user else uuid.UUID(int=0)
    except ValueError as exc:
        raise BadRequest(f"{ON_BEHALF_HEADER} is not a user id") from exc
    return Principal.build(user_id=user_id, org_id=org_id, role=role)
