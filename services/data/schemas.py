"""Request and response models of the data API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from workbench.schemas import PartialUpdate, RequestModel, example

Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=50, pattern=r"^[^\s,]+$")]
Label = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Format = Literal["csv", "tsv", "jsonl", "json", "parquet", "txt", "zip"]
Strategy = Literal["redact", "partial", "hash"]
Note = Annotated[str, StringConstraints(max_length=2000)]




class DatasetCreate(RequestModel):
    model_config = RequestModel.model_config | example({
        "project_id": "01a207b0-5d1c-7f3e-9a44-2f1e6c9b7a10", "name": "support-tickets",
        "description": "Tickets of 2025, one row per ticket", "tags": ["support", "2025"],
        "sensitive": True})

    project_id: uuid.UUID
    name: Name
    description: Annotated[str, StringConstraints(max_length=5000)] = ""
    tags: Annotated[list[Tag], Field(max_length=20)] = Field(default_factory=list)
    sensitive: bool = False


class DatasetUpdate(PartialUpdate):
    model_config = RequestModel.model_config | example({"description": "Tickets 2025, cleaned",
                                                    "tags": ["support"]})
    _not_null = ("name", "description", "tags", "sensitive")

    name: Name | None = None
    description: Annotated[str, StringConstraints(max_length=5000)] | None = None
    tags: Annotated[list[Tag], Field(max_length=20)] | None = None
    sensitive: bool | None = None


class DatasetRead(BaseModel):
    model_config = ConfigDict(from_attributes=True) | example({
        "id": "01a207b1-…", "org_id": "01a207ae-…", "project_id": "01a207b0-…",
        "owner_id": "01a207ae-…", "name": "support-tickets", "description": "",
        "tags": ["support"], "sensitive": True, "status": "ready", "latest_version": 2,
        "format": "csv", "row_count": 1200, "size_bytes": 2048000,
        "created_at": "2026-11-23T10:00:00Z", "updated_at": "2026-11-23T10:05:00Z",
        "deleted_at": None, "purge_after": None})

    id: uuid.UUID
    org_id: uuid.UUID
    project_id: uuid.UUID
    owner_id: uuid.UUID
    name: str
    description: str
    tags: list[str]
    sensitive: bool
    status: str
    latest_version: int
    format: str | None
    row_count: int | None
    size_bytes: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    purge_after: datetime | None


class VersionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True) | example({
        "id": "01a207b2-…", "dataset_id": "01a207b1-…", "number": 1,
        "filename": "tickets.csv", "format": "csv", "content_type": "text/csv",
        "size_bytes": 2048000, "sha256": "9f86d081…", "encrypted": True,
        "row_count": 1200, "schema": [{"name": "ticket_id", "type": "int64"},
                                      {"name": "body", "type": "string"}],
        "stats": {"ticket_id": {"type": "int64", "count": 1200, "nulls": 0, "min": 1,
                                "max": 1200, "mean": 600.5}},
        "members": None, "note": "first export", "parents": [],
        "transform": {"type": "upload"}, "created_by": "user:01a207ae-…",
        "created_at": "2026-11-23T10:05:00Z", "pii_scanned": False})

    id: uuid.UUID
    dataset_id: uuid.UUID
    number: int
    filename: str
    format: str
    content_type: str
    size_bytes: int
    sha256: str
    encrypted: bool
    row_count: int
    schema_: list[dict[str, Any]] = Field(alias="schema", serialization_alias="schema")
    stats: dict[str, Any]
    members: list[dict[str, Any]] | None
    note: str
    parents: list[str]
    transform: dict[str, Any]
    created_by: str
    created_at: datetime
    pii_scanned: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, value: Any) -> Any:
        if hasattr(value, "object_key"):  # an ORM row
            return {**{k: getattr(value, k) for k in (
                "id", "dataset_id", "number", "filename", "format", "content_type",
                "size_bytes", "sha256", "encrypted", "row_count", "schema", "stats",
                "members", "note", "parents", "transform", "created_by", "created_at")},
                "pii_scanned": value.pii_report is not None}
        return value


class PreviewPage(BaseModel):
    model_config = example({"number": 1, "offset": 0, "rows": [{"ticket_id": 1, "body": "…"}],
                        "kept": 100, "row_count": 1200})

    number: int
    offset: int
    rows: list[dict[str, Any]]
    kept: int = Field(description="How many leading rows are kept as the preview")
    row_count: int


class LineageNode(BaseModel):
    version_id: uuid.UUID
    dataset_id: uuid.UUID
    dataset_name: str | None
    number: int
    format: str
    sha256: str
    created_at: datetime
    transform: dict[str, Any]
    note: str


class LineageEdge(BaseModel):
    parent: uuid.UUID
    child: uuid.UUID
    transform: dict[str, Any]


class Lineage(BaseModel):
    model_config = example({
        "dataset_id": "01a207b1-…",
        "nodes": [{"version_id": "01a207b2-…", "dataset_id": "01a207b1-…",
                   "dataset_name": "tickets", "number": 1, "format": "csv",
                   "sha256": "9f86…", "created_at": "2026-11-23T10:05:00Z",
                   "transform": {"type": "upload"}, "note": ""},
                  {"version_id": "01a207b3-…", "dataset_id": "01a207b1-…",
                   "dataset_name": "tickets", "number": 2, "format": "csv",
                   "sha256": "1b4f…", "created_at": "2026-11-23T10:07:00Z",
                   "transform": {"type": "mask", "strategy": "partial"}, "note": ""}],
        "edges": [{"parent": "01a207b2-…", "child": "01a207b3-…",
                   "transform": {"type": "mask", "strategy": "partial"}}]})

    dataset_id: uuid.UUID
    nodes: list[LineageNode]
    edges: list[LineageEdge]


class UploadCreate(RequestModel):
    model_config = RequestModel.model_config | example({
        "filename": "events-2025.jsonl", "size": 5368709120, "format": "jsonl",
        "note": "full year"})

    filename: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    size: int = Field(gt=0, description="The file's size in bytes")
    format: Format | None = Field(default=None, description="Omit to detect from the content")
    note: Note = ""


class UploadRead(BaseModel):
    model_config = ConfigDict(from_attributes=True) | example({
        "id": "01a207c0-…", "dataset_id": "01a207b1-…", "filename": "events-2025.jsonl",
        "size": 5368709120, "received": 268435456, "status": "open",
        "expires_at": "2026-11-24T10:00:00Z", "version_id": None})

    id: uuid.UUID
    dataset_id: uuid.UUID
    filename: str
    size: int
    received: int
    status: str
    expires_at: datetime
    version_id: uuid.UUID | None


class UploadComplete(RequestModel):
    model_config = RequestModel.model_config | example({"note": "full year"})

    note: Note | None = None


class MaskColumn(RequestModel):
    column: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    strategy: Strategy | None = Field(default=None, description="Default: the request's")
    whole_value: bool = Field(default=False, description="Mask the whole cell, not only the "
                                                         "PII found in it")


class MaskRequest(RequestModel):
    model_config = RequestModel.model_config | example({
        "strategy": "partial", "note": "shareable copy",
        "columns": [{"column": "customer_name", "whole_value": True},
                    {"column": "notes", "strategy": "redact"}]})

    strategy: Strategy = "redact"
    columns: Annotated[list[MaskColumn], Field(max_length=500)] | None = Field(
        default=None, description="Omit to mask what the version's PII scan found")
    note: Note = ""


class PiiColumn(BaseModel):
    column: str
    kinds: dict[str, int]
    values_scanned: int
    examples: dict[str, list[str]]
    name_column: bool


class PiiReport(BaseModel):
    model_config = example({
        "version_id": "01a207b2-…", "number": 1, "rows_scanned": 1200,
        "scanned_at": "2026-11-23T10:06:00Z", "totals": {"email": 1180, "phone": 14},
        "columns": [{"column": "contact", "kinds": {"email": 1180}, "values_scanned": 1200,
                     "examples": {"email": ["a***@example.com"]}, "name_column": False}]})

    version_id: uuid.UUID
    number: int
    rows_scanned: int
    scanned_at: datetime
    totals: dict[str, int]
    columns: list[PiiColumn]


class TaskCreate(RequestModel):
    model_config = RequestModel.model_config | example({
        "name": "Ticket intent", "labels": ["billing", "bug", "how-to"], "version": 2,
        "instructions": "One intent per ticket", "assignee_id": None})

    name: Name
    labels: Annotated[list[Label], Field(min_length=2, max_length=200)]
    version: int | None = Field(default=None, ge=1, description="Default: the latest")
    instructions: Annotated[str, StringConstraints(max_length=10000)] = ""
    assignee_id: uuid.UUID | None = None


class TaskUpdate(PartialUpdate):
    model_config = RequestModel.model_config | example({"status": "completed"})
    _not_null = ("name", "status", "instructions")

    name: Name | None = None
    instructions: Annotated[str, StringConstraints(max_length=10000)] | None = None
    assignee_id: uuid.UUID | None = None
    status: Literal["pending", "in_progress", "completed"] | None = None


class TaskRead(BaseModel):
    model_config = ConfigDict(from_attributes=True) | example({
        "id": "01a207d0-…", "dataset_id": "01a207b1-…", "version_id": "01a207b2-…",
        "name": "Ticket intent", "instructions": "", "task_type": "classification",
        "labels": ["billing", "bug", "how-to"], "assignee_id": None, "status": "in_progress",
        "total_rows": 1200, "labelled_rows": 340, "created_by": "user:01a207ae-…",
        "created_at": "2026-11-23T10:10:00Z", "updated_at": "2026-11-23T11:00:00Z",
        "completed_at": None})

    id: uuid.UUID
    dataset_id: uuid.UUID
    version_id: uuid.UUID
    name: str
    instructions: str
    task_type: str
    labels: list[str]
    assignee_id: uuid.UUID | None
    status: str
    total_rows: int
    labelled_rows: int
    created_by: str
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


class LabelItem(RequestModel):
    row: int = Field(ge=0, description="0-based row in file order")
    label: Label


class LabelsSet(RequestModel):
    model_config = RequestModel.model_config | example({"items": [{"row": 0, "label": "billing"},
                                                              {"row": 1, "label": "bug"}]})

    items: Annotated[list[LabelItem], Field(min_length=1, max_length=5000)]


class LabelRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    row: int
    label: str
    annotator: str
    updated_at: datetime


class LabelPage(BaseModel):
    items: list[LabelRead]
    next_cursor: str | None = None


class ExportRequest(RequestModel):
    model_config = RequestModel.model_config | example({"only_labelled": True,
                                                    "note": "intent labels, round 1"})

    only_labelled: bool = False
    note: Note = ""
