"""The CloudEvents-style envelope every platform event travels in."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field


def new_event_id() -> str:
    return uuid.uuid4().hex


class EventEnvelope(BaseModel):
    """`type` is `wb.<service>.<entity>.<past-tense verb>`; `data` is the payload whose contract
    is the protobuf message that declares this type in proto/ (see workbench.events.contracts)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: str = "1.0"
    id: str = Field(default_factory=new_event_id)
    type: str = Field(pattern=r"^wb\.[a-z_]+\.[a-z_]+\.[a-z_]+$")
    source: str
    subject: str | None = None
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    org_id: str | None = None
    actor: str | None = None
    traceparent: str | None = None
    request_id: str | None = None
    ip: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def nats_subject(self) -> str:
        return self.type

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, raw: bytes) -> EventEnvelope:
        return cls.model_validate_json(raw)
