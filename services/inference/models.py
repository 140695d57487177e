"""Tables of the inference service: the external model endpoints an org registers, deployments
(model + runtime + replicas), routes that split traffic between deployments, and content-safety
rules. The built-in models are not rows: they ship with the platform (catalog.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from workbench.db import IdMixin, TenantMixin, TimestampMixin, UTCDateTime, new_metadata
from workbench.events.outbox import event_tables


class Base(DeclarativeBase):
    metadata = new_metadata()


EVENT_TABLES = event_tables(Base.metadata)


class ExternalModel(IdMixin, TenantMixin, TimestampMixin, Base):
    """An OpenAI-compatible endpoint an org registered; its API key is stored encrypted and
    never returned."""

    __tablename__ = "external_models"
    __table_args__ = (Index("uq_external_models_name", "org_id", "name", unique=True),)

    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))  # chat | embedding
    base_url: Mapped[str] = mapped_column(String(500))
    remote_model: Mapped[str] = mapped_column(String(200))
    api_key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    context_length: Mapped[int] = mapped_column(Integer, default=4096)
    description: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(200))


class Deployment(IdMixin, TenantMixin, TimestampMixin, Base):
    """A model served by a runtime with N replicas. `status`: pending → deploying → running →
    stopped | failed (`reason` says why)."""

    __tablename__ = "deployments"
    __table_args__ = (Index("uq_deployments_name", "org_id", "name", unique=True),)

    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    # "builtin:<name>" or "external:<id>"
    model: Mapped[str] = mapped_column(String(300))
    model_version: Mapped[str] = mapped_column(String(50), default="")
    kind: Mapped[str] = mapped_column(String(20))  # chat | embedding
    runtime: Mapped[str] = mapped_column(String(20))  # local | openai | vllm
    replicas: Mapped[int] = mapped_column(Integer, default=1)
    resources: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Route(IdMixin, TenantMixin, TimestampMixin, Base):
    """A model name clients call that splits traffic between deployments by weight."""

    __tablename__ = "routes"
    __table_args__ = (Index("uq_routes_name", "org_id", "name", unique=True),)

    name: Mapped[str] = mapped_column(String(100))
    # [{"deployment_id": "...", "weight": 90}, …]
    arms: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_by: Mapped[str] = mapped_column(String(200))


class SafetyRule(IdMixin, TenantMixin, TimestampMixin, Base):
    __tablename__ = "safety_rules"

    name: Mapped[str] = mapped_column(String(200))
    stage: Mapped[str] = mapped_column(String(10))  # input | output | both
    kind: Mapped[str] = mapped_column(String(20))  # keywords | regex | pii
    patterns: Mapped[list[str]] = mapped_column(JSON, default=list)
    action: Mapped[str] = mapped_column(String(10))  # block | redact
    replacement: Mapped[str] = mapped_column(String(100), default="[REDACTED]")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str] = mapped_column(String(200))

