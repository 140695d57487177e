"""The generic tenant-scoped repository: every query on tenant data goes through `scoped()`,
so a review can grep for any that does not."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from workbench.db import TenantMixin
from workbench.errors import BadRequest, NotFound

M = TypeVar("M", bound=TenantMixin)


def decode_cursor(cursor: str | None) -> uuid.UUID | None:
    if not cursor:
        return None
    try:
        return uuid.UUID(cursor)
    except ValueError as exc:
        raise BadRequest("cursor is not valid; pass back the next_cursor of a previous page",
                         code="invalid_cursor") from exc


class Repository(Generic[M]):
    """get / list with cursor pagination / add / delete, all filtered by org. Rows have
    time-ordered uuid7 ids, so the id is the cursor."""

    model: type[M]
    noun: str = "resource"

    def __init__(self, session: AsyncSession, org_id: uuid.UUID) -> None:
        self.session = session
        self.org_id = org_id

    def scoped(self) -> Select[Any]:
        return select(self.model).where(self.model.org_id == self.org_id)

    async def get(self, id: uuid.UUID) -> M:
        row: M | None = (
            await self.session.execute(self.scoped().where(self._id_col() == id))
        ).scalar_one_or_none()
        if row is None:
            raise NotFound(f"{self.noun} {id} does not exist")
        return row

    async def list(
        self, *, limit: int = 50, cursor: str | None = None, where: Sequence[Any] = ()
    ) -> tuple[list[M], str | None]:
        stmt = self.scoped()
        for clause in where:
            stmt = stmt.where(clause)
        after = decode_cursor(cursor)
        if after is not None:
            stmt = stmt.where(self._id_col() > after)
        rows: list[M] = list(
            (await self.session.execute(stmt.order_by(self._id_col()).limit(limit + 1)))
            .scalars()
            .all()
        )
        last_id = getattr(rows[limit - 1], "id") if len(rows) > limit else None  # noqa: B009
        next_cursor = str(last_id) if last_id is not None else None
        return rows[:limit], next_cursor

    async def add(self, obj: M) -> M:
        if obj.org_id != self.org_id:
            raise ValueError("object belongs to another org")
        self.session.add(obj)
        await self.session.flush()
        return obj

    async def delete(self, obj: M) -> None:
        await self.session.delete(obj)
        await self.session.flush()

    def _id_col(self) -> Any:
        return getattr(self.model, "id")  # noqa: B009
