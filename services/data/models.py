"""Tables of the data service: datasets, their immutable versions (with lineage), resumable
uploads, per-org encryption keys, and annotation tasks with their labels."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from workbench.db import IdMixin, TenantMixin, TimestampMixin, UTCDateTime, new_metadata, utcnow
from workbench.events.outbox import event_tables


class Base(DeclarativeBase):
    metadata = new_metadata()


EVENT_TABLES = event_tables(Base.metadata)


class Dataset(IdMixin, TenantMixin, TimestampMixin, Base):
    """A named, versioned body of data in a project. Deleting is soft (`deleted_at`) until the
    purge, which removes the files and releases the storage."""

    __tablename__ = "datasets"
    __table_args__ = (
        # Names are unique among a project's live datasets.
        Index("uq_datasets_live_name", "org_id", "project_id", "name", unique=True,
              postgresql_where=text("deleted_at IS NULL"),
              sqlite_where=text("deleted_at IS NULL")),
    )

    project_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    owner_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False)
    # empty (no version yet) or ready
    status: Mapped[str] = mapped_column(String(20), default="empty")
    latest_version: Mapped[int] = mapped_column(Integer, default=0)
    format: Mapped[str | None] = mapped_column(String(20), nullable=True)
    row_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Over all versions (what the org's storage quota is charged).
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    purge_after: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class DatasetVersion(IdMixin, TenantMixin, Base):
    """One immutable file of a dataset. `parents` and `transform` make the lineage: an upload
    has no parents; a masked or labelled version names the versions it was made from."""

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "number"),)

    dataset_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    object_key: Mapped[str] = mapped_column(String(500))
    filename: Mapped[str] = mapped_column(String(300))
    format: Mapped[str] = mapped_column(String(20))
    content_type: Mapped[str] = mapped_column(String(100))
    # Of the plaintext; `stored_bytes` is what the object store holds (larger when encrypted).
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    stored_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    schema: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    row_count: Mapped[int] = mapped_column(BigInteger, default=0)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    preview: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    members: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
    parents: Mapped[list[str]] = mapped_column(JSON, default=list)
    transform: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    pii_report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VersionParent(Base):
    """An edge of the lineage graph: `child_id` was made from `parent_id` (any dataset of the
    same org)."""

    __tablename__ = "dataset_version_parents"

    child_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("dataset_versions.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, index=True)
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)


class Upload(IdMixin, TenantMixin, Base):
    """A resumable upload: chunks arrive in order (each at the offset received so far) and are
    kept as parts in the object store until the upload completes into a version."""

    __tablename__ = "dataset_uploads"

    dataset_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(300))
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str | None] = mapped_column(String(20), nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
    received: Mapped[int] = mapped_column(BigInteger, default=0)
    parts: Mapped[list[list[int]]] = mapped_column(JSON, default=list)  # [[offset, size], …]
    # open, completing, completed, aborted
    status: Mapped[str] = mapped_column(String(20), default="open")
    version_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class OrgKey(Base):
    """An organization's data key, wrapped under the platform's key-encryption key."""

    __tablename__ = "data_org_keys"

    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AnnotationTask(IdMixin, TenantMixin, TimestampMixin, Base):
    """Labelling rows of one dataset version with one label each, from a fixed label set."""

    __tablename__ = "annotation_tasks"

    dataset_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    version_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    name: Mapped[str] = mapped_column(String(200))
    instructions: Mapped[str] = mapped_column(Text, default="")
    task_type: Mapped[str] = mapped_column(String(40), default="classification")
    labels: Mapped[list[str]] = mapped_column(JSON, default=list)
    assignee_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    # pending, in_progress, completed
    status: Mapped[str] = mapped_column(String(20), default="pending")
    total_rows: Mapped[int] = mapped_column(BigInteger)
    labelled_rows: Mapped[int] = mapped_column(BigInteger, default=0)
    created_by: Mapped[str] = mapped_column(String(200))
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Annotation(Base):
    """The label of one row (0-based, in file order) in a task."""

    __tablename__ = "annotations"

    task_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("annotation_tasks.id", ondelete="CASCADE"), primary_key=True)
    row: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    label: Mapped[str] = mapped_column(String(200))
    annotator: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
