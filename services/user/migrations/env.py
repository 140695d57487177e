"""Alembic environment of the user service."""

from services.user.models import Base
from workbench.migrations import run_env

run_env(Base.metadata)
