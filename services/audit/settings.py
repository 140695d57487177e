"""Settings of the audit service."""

from __future__ import annotations

from pydantic import Field

from workbench.settings import ObjectStoreSettings, ServiceSettings


class AuditSettings(ServiceSettings, ObjectStoreSettings):
    # How often retention policies are applied in the background.
    audit_retention_interval_s: float = Field(default=3600.0, gt=0)
    # Events taken from the bus per transaction.
    audit_batch_size: int = Field(default=1000, ge=1, le=5000)
