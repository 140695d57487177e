"""Settings of the gateway."""

from __future__ import annotations

from pydantic import Field

from workbench.settings import AuthSettings, BusSettings, CoreSettings, RedisSettings


class GatewaySettings(CoreSettings, AuthSettings, RedisSettings, BusSettings):
    # Where each service listens in distributed mode: {"user": "http://127.0.0.1:8001", …}.
    upstreams: dict[str, str] = Field(default_factory=dict)
    rate_limit_authenticated: str = "1200/60"
    rate_limit_anonymous: str = "120/60"
    rate_limit_enabled: bool = True
    trusted_proxies: list[str] = Field(default_factory=list)
    api_key_cache_ttl_s: float = Field(default=60.0, ge=0)
    upstream_connect_timeout_s: float = Field(default=3.0, gt=0)
    upstream_read_timeout_s: float = Field(default=600.0, gt=0)
    # Publish an access record (wb.gateway.access.recorded) per request, for the audit log.
    access_records: bool = True
    # Request bodies of the upload routes (routes.UPLOAD_ROUTES) may be this large; the service
    # behind applies the org's quota. Other routes keep max_body_bytes.
    upload_max_body_bytes: int = Field(default=20 << 30, ge=1024)
