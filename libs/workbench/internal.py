"""Service-to-service routes (`/internal/...`): never routed by the gateway, and guarded by the
deployment's internal token so a caller inside the network still has to prove itself."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from workbench.errors import Unauthorized

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
