"""Tables of the audit service: append-only records in per-org hash chains, the head of each
chain, retention policies and the archives that retention wrote."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String, UniqueConstraint, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from workbench.db import IdMixin, UTCDateTime, new_metadata, utcnow
from workbench.events.outbox import event_tables

GENESIS_HASH = "0" * 64
PLATFORM_CHAIN = "platform"


class Base(DeclarativeBase):
    metadata = new_metadata()


EVENT_TABLES = event_tables(Base.metadata)


class AuditRecord(IdMixin, Base):
    """One thing that happened. `hash` covers every other column and `prev_hash`, so changing
    or removing a record breaks the chain from that record on."""

    __tablename__ = "audit_records"
    __table_args__ = (
        UniqueConstraint("chain", "seq"),
        Index("ix_audit_records_org_occurred", "org_id", "occurred_at"),
    )

    org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)
    chain: Mapped[str] = mapped_column(String(40))
    seq: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    event_type: Mapped[str] = mapped_column(String(200), index=True)
    action: Mapped[str] = mapped_column(String(40), index=True)
    actor: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    resource_type: Mapped[str] = mapped_column(String(100), index=True)
    resource_id: Mapped[str | None] = mapped_column(String(300), nullable=True, index=True)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    trace_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class ChainHead(Base):
    """Where each chain ends, and where it starts after archiving (the anchor)."""

    __tablename__ = "audit_chain_heads"

    chain: Mapped[str] = mapped_column(String(40), primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    last_hash: Mapped[str] = mapped_column(String(64), default=GENESIS_HASH)
    anchor_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    anchor_hash: Mapped[str] = mapped_column(String(64), default=GENESIS_HASH)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class RetentionPolicy(Base):
    __tablename__ = "audit_retention_policies"

    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    days: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Archive(IdMixin, Base):
    """Records moved to the object store; `last_hash` is the new anchor of the chain."""

    __tablename__ = "audit_archives"

    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    chain: Mapped[str] = mapped_column(String(40))
    from_seq: Mapped[int] = mapped_column(BigInteger)
    to_seq: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    first_prev_hash: Mapped[str] = mapped_column(String(64))
    last_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
