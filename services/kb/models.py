"""Tables of the kb service: knowledge bases, their documents (one row per file, with ingestion
progress and a lease so an interrupted ingestion is resumed by whichever replica is up), chunks
(the text, heading and page of every piece; their vectors live in Milvus) and the keyword index
(BM25 postings per chunk, so keyword search needs no second engine)."""

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
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from workbench.db import IdMixin, TenantMixin, TimestampMixin, UTCDateTime, new_metadata
from workbench.events.outbox import event_tables


class Base(DeclarativeBase):
    metadata = new_metadata()


EVENT_TABLES = event_tables(Base.metadata)


class KnowledgeBase(IdMixin, TenantMixin, TimestampMixin, Base):
    """A searchable body of documents of a project, embedded by one embedding deployment of the
    inference service. `access` narrows who may read or write it beyond the org's roles."""

    __tablename__ = "knowledge_bases"
    __table_args__ = (UniqueConstraint("org_id", "project_id", "name"),)

    project_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    # A deployment or route name of the org in the inference service (kind embedding).
    embedding_model: Mapped[str] = mapped_column(String(200))
    embedding_dim: Mapped[int] = mapped_column(Integer)
    # The chat model answers come from unless a request names one.
    chat_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    chunk_strategy: Mapped[str] = mapped_column(String(20), default="recursive")
    chunk_size: Mapped[int] = mapped_column(Integer, default=256)
    chunk_overlap: Mapped[int] = mapped_column(Integer, default=32)
    # manual | daily | weekly
    update_strategy: Mapped[str] = mapped_column(String(20), default="manual")
    # {"read": ["role:member", "user:<id>", …], "write": [...]}; empty lists: the roles decide.
    access: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    document_count: Mapped[int] = mapped_column(Integer, default=0)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    last_refresh_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    next_refresh_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_by: Mapped[str] = mapped_column(String(100))


class Document(IdMixin, TenantMixin, TimestampMixin, Base):
    """A file of a knowledge base. Ingestion builds `generation` (1, 2, … one per content
    change) while `live_generation` keeps answering queries; when the new one is indexed it
    becomes live and the old chunks and vectors are removed."""

    __tablename__ = "kb_documents"
    __table_args__ = (UniqueConstraint("kb_id", "name"),
                      Index("ix_kb_documents_queue", "status", "lease_until"))

    kb_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("knowledge_bases.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(300))
    format: Mapped[str | None] = mapped_column(String(20), nullable=True)
    content_type: Mapped[str] = mapped_column(String(100), default="application/octet-stream")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(500))
    # {"type": "upload"} or {"type": "dataset", "dataset_id": …, "version": n}
    source: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Caller-supplied fields retrieval can filter on.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    # queued | processing | indexed | failed
    status: Mapped[str] = mapped_column(String(20), default="queued")
    error: Mapped[str] = mapped_column(Text, default="")
    error_code: Mapped[str] = mapped_column(String(50), default="")
    generation: Mapped[int] = mapped_column(Integer, default=1)
    live_generation: Mapped[int] = mapped_column(Integer, default=0)
    chunks_total: Mapped[int] = mapped_column(Integer, default=0)
    chunks_done: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    indexed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_by: Mapped[str] = mapped_column(String(100))


class Chunk(TenantMixin, Base):
    """One piece of a document's generation. The id is derived from (document, generation,
    index), so a resumed ingestion rewrites the same rows and vectors instead of adding copies."""

    __tablename__ = "kb_chunks"
    __table_args__ = (UniqueConstraint("document_id", "generation", "idx"),
                      Index("ix_kb_chunks_kb", "kb_id", "indexed"))

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    kb_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    document_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("kb_documents.id", ondelete="CASCADE"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    idx: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    heading: Mapped[str] = mapped_column(Text, default="")
    page: Mapped[int | None] = mapped_column(Integer, nullable=True)
    token_count: Mapped[int] = mapped_column(Integer, default=0)
    # Terms in the chunk (BM25's document length).
    length: Mapped[int] = mapped_column(Integer, default=0)
    # Embedded, in Milvus and in the keyword index.
    indexed: Mapped[bool] = mapped_column(Boolean, default=False)


class Posting(Base):
    """BM25 keyword index: how often `term` occurs in a chunk."""

    __tablename__ = "kb_postings"
    __table_args__ = (Index("ix_kb_postings_term", "kb_id", "term"),)

    chunk_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("kb_chunks.id", ondelete="CASCADE"), primary_key=True)
    term: Mapped[str] = mapped_column(String(100), primary_key=True)
    kb_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    tf: Mapped[int] = mapped_column(Integer)


