"""Request-scoped dependencies shared by every service, defined once as Annotated aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from workbench.db import Database


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed when the route returns, rolled back when it
    raises — before the response is sent, so a 2xx means the change is stored."""
    db: Database = request.app.state.db
    async with db.sessionmaker() as session:
        async with session.begin():
            yield session
        db.after_commit(session)


SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]
