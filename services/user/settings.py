"""Settings of the user service."""

from __future__ import annotations

from pydantic import Field

from workbench.settings import ServiceSettings

DEFAULT_QUOTAS: dict[str, int] = {
    "members": 100,
    "projects": 200,
    "api_keys": 200,
    "storage_bytes": 50 * 1024**3,
    "gpu_hours": 100,
    "tokens_per_day": 5_000_000,
}


class UserSettings(ServiceSettings):
    access_ttl_s: int = Field(default=300, ge=30, le=3600)
    refresh_ttl_s: int = Field(default=30 * 86400, ge=300)
    key_exchange_ttl_s: int = Field(default=300, ge=30, le=3600)
    # How often each replica re-reads the signing keys (picks up a rotation made elsewhere).
    keyring_reload_interval_s: float = Field(default=30.0, gt=0, le=3600)
    # argon2id cost; the defaults are RFC 9106's second recommended option.
    password_time_cost: int = Field(default=3, ge=1, le=20)
    password_memory_kib: int = Field(default=65536, ge=8192, le=4 * 1024 * 1024)
