"""API schema building blocks shared by every service: pages, strict request models."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, ConfigDict, model_validator

T = TypeVar("T")


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are refused (no mass assignment), strings are
    stripped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def example(values: dict[str, Any]) -> ConfigDict:
    """A model config that documents one example in the OpenAPI schema."""
    return ConfigDict(json_schema_extra={"examples": [values]})


class PartialUpdate(RequestModel):
    """A partial update: omit a field to keep it; `null` is refused for the fields named in
    `_not_null` (those whose value must exist)."""

    _not_null: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _refuse_nulls(self) -> PartialUpdate:
        for name in self._not_null:
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null; omit it to keep the current value")
        return self


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    """A page of a list; pass `next_cursor` back as `cursor` for the next page."""

    items: list[T]
    next_cursor: str | None = None


LimitQuery = Annotated[int, Query(ge=1, le=200, description="Page size")]
CursorQuery = Annotated[str | None, Query(max_length=200, description="From `next_cursor`")]
