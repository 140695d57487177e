"""Alembic environment of the data service."""

from services.data.models import Base
from workbench.migrations import run_env

run_env(Base.metadata)
