"""Request and response models of the audit API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workbench.schemas import RequestModel


class AuditRecordRead(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [{
        "id": "01a207ae-cb7c-7db2-ba03-2b93eb17260c", "org_id": "01a207ae-cb80-…",
        "seq": 42, "occurred_at": "2026-11-23T09:13:45.596839Z",
        "recorded_at": "2026-11-23T09:13:45.612000Z", "action": "create",
        "actor": "user:01a207ae-…", "resource_type": "user.project",
        "resource_id": "01a207b0-…", "event_type": "wb.user.project.created",
        "event_id": "5e1f…", "status": None, "ip": "10.0.0.7", "request_id": "e64be9ff…",
        "trace_id": "56de29f2b14d142410850acfb1135b2a",
        "details": {"project_id": "01a207b0-…", "name": "Support bot"},
        "prev_hash": "9c1e…", "hash": "0f3a…"}]})

    id: uuid.UUID
    org_id: uuid.UUID | None
    seq: int
    occurred_at: datetime
    recorded_at: datetime
    action: str
    actor: str | None
    resource_type: str
    resource_id: str | None
    event_type: str
    event_id: str
    status: int | None
    ip: str | None
    request_id: str | None
    trace_id: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str


class BrokenLink(BaseModel):
    id: uuid.UUID | None
    seq: int
    reason: str


class VerifyResult(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"ok": False, "checked": 41, "last_seq": 120, "anchor_seq": 0,
         "first_broken": {"id": "01a207ae-…", "seq": 42,
                          "reason": "its content does not match its hash (the record was "
                                    "changed)"}}]})

    ok: bool
    checked: int = Field(description="Records that verified before the first broken one")
    last_seq: int
    anchor_seq: int = Field(description="Records up to here were archived by retention")
    first_broken: BrokenLink | None


class RetentionPolicyWrite(RequestModel):
    model_config = RequestModel.model_config | ConfigDict(
        json_schema_extra={"examples": [{"days": 365}]})

    days: int = Field(ge=1, le=36500, description="Keep records this many days in the database")


class RetentionPolicyRead(BaseModel):
    org_id: uuid.UUID
    days: int | None
    last_run_at: datetime | None


class ArchiveRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    from_seq: int
    to_seq: int
    records: int
    object_key: str
    sha256: str
    first_prev_hash: str
    last_hash: str
    created_at: datetime


class Summary(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "since": "2026-11-01T00:00:00Z", "until": "2026-12-01T00:00:00Z", "total": 1234,
        "by_action": {"read": 900, "create": 200, "login": 80, "login_failed": 4},
        "by_actor": {"user:01a2…": 700}, "failed_logins": 4, "permission_denials": 2,
        "data_exports": 1}]})

    since: datetime
    until: datetime
    total: int
    by_action: dict[str, int]
    by_actor: dict[str, int]
    failed_logins: int
    permission_denials: int
    data_exports: int
