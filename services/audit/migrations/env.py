"""Alembic environment of the audit service."""

from services.audit.models import Base
from workbench.migrations import run_env

run_env(Base.metadata)
