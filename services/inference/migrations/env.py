"""Alembic environment of the inference service."""

from services.inference.models import Base
from workbench.migrations import run_env

run_env(Base.metadata)
