"""Settings: one pydantic-settings class per service, composed from the mixins below. Every
value comes from `WB_*` environment variables; nothing else in the code base reads os.environ."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET = "embedded-mode-only-secret-change-me"


class RunMode(StrEnum):
    EMBEDDED = "embedded"
    DISTRIBUTED = "distributed"


class CoreSettings(BaseSettings):
    """What every process needs: run mode, where local state lives, logging, request limits."""

    model_config = SettingsConfigDict(env_prefix="WB_", extra="ignore")

    mode: RunMode = RunMode.EMBEDDED
    data_dir: Path = Path("var")
    log_level: str = "INFO"
    log_json: bool = True
    access_log: bool = True
    trace_export: str = Field(default="none", pattern="^(none|console)$")
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    secret_key: SecretStr = SecretStr(DEFAULT_SECRET)
    internal_token: SecretStr = SecretStr(DEFAULT_SECRET)

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> CoreSettings:
        if self.mode is RunMode.DISTRIBUTED:
            for name in ("secret_key", "internal_token"):
                value: SecretStr = getattr(self, name)
                if value.get_secret_value() == DEFAULT_SECRET or len(value.get_secret_value()) < 16:
                    raise ValueError(
                        f"WB_{name.upper()} must be set to a secret of 16+ characters "
                        "in distributed mode (the built-in default is for embedded mode only)"
                    )
        return self


class DatabaseSettings(BaseSettings):
    """`database_url` is a SQLAlchemy async URL. Empty means: embedded SQLite file per service
    under data_dir; in distributed mode a PostgreSQL URL is required (one schema per service)."""

    model_config = SettingsConfigDict(env_prefix="WB_", extra="ignore")

    database_url: str = ""
    db_pool_size: int = Field(default=10, ge=1)
    db_echo: bool = False


class BusSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WB_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    nats_stream: str = "WB_EVENTS"
    nats_duplicate_window_s: float = Field(default=300.0, gt=0)
    outbox_batch_size: int = Field(default=200, ge=1, le=5000)
    outbox_poll_interval_s: float = Field(default=1.0, gt=0)
    # On shutdown a consumer finishes (handles and acks) the batch in hand for up to this long;
    # past it the batch is cancelled and handed back to the stream (nak) for immediate
    # redelivery.
    consumer_stop_grace_s: float = Field(default=10.0, ge=0)


class RedisSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WB_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"


class ObjectStoreSettings(BaseSettings):
    """Embedded mode keeps objects under data_dir/objects; distributed mode uses S3/MinIO."""

    model_config = SettingsConfigDict(env_prefix="WB_", extra="ignore")

    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    s3_bucket: str = "workbench"


class AuthSettings(BaseSettings):
    """How tokens are verified. `jwks_url` is where the user service publishes its keys."""

    model_config = SettingsConfigDict(env_prefix="WB_", extra="ignore")

    jwt_issuer: str = "xai-workbench"
    jwt_audience: str = "xai-workbench"
    jwks_url: str = "http://127.0.0.1:8001/.well-known/jwks.json"
    jwks_min_refresh_interval_s: float = Field(default=1.0, ge=0, le=60)
    jwt_leeway_s: int = Field(default=5, ge=0, le=60)


class ServiceSettings(CoreSettings, DatabaseSettings, BusSettings, AuthSettings):
    """The usual composition for a domain service; services subclass it and add their own."""
