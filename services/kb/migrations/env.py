"""Alembic environment of the kb service."""

from services.kb.models import Base
from workbench.migrations import run_env

run_env(Base.metadata)
