"""Alembic per service: each service has its own migrations folder and version table, applied
to its SQLite file or its PostgreSQL schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection

from workbench.db import Database, UTCDateTime


def _config(script_location: Path, service: str, connection: Connection | None,
            schema: str | None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = connection
    cfg.attributes["schema"] = schema
    cfg.attributes["version_table"] = f"alembic_version_{service}"
    return cfg


async def upgrade(db: Database, script_location: Path, service: str,
                  revision: str = "head") -> None:
    if db.schema:
        async with db.engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{db.schema}"'))

    def run(connection: Connection) -> None:
        command.upgrade(_config(script_location, service, connection, db.schema), revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


async def autogenerate(db: Database, script_location: Path, service: str, message: str) -> None:
    """Write a new revision from the difference between the models and the database."""
    await upgrade(db, script_location, service)

    def run(connection: Connection) -> None:
        command.revision(_config(script_location, service, connection, db.schema),
                         message=message, autogenerate=True)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    # Our column types are plain SQL types with Python-side conversion; migrations name the
    # SQL type so they never import application code.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_env(target_metadata: MetaData) -> None:
    """The body of every service's migrations/env.py (online mode, connection given)."""
    from alembic import context as alembic_context

    cfg = alembic_context.config
    connection: Any = cfg.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations with `wb migrate`, which supplies the connection")
    schema = cfg.attributes.get("schema")
    alembic_context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=cfg.attributes["version_table"],
        version_table_schema=schema,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=_render_item,
    )
    with alembic_context.begin_transaction():
        alembic_context.run_migrations()
