"""Settings of the kb service."""

from __future__ import annotations

from pydantic import Field

from workbench.settings import ObjectStoreSettings, ServiceSettings


class KbSettings(ServiceSettings, ObjectStoreSettings):
    # The user service (projects) and the inference service (embeddings, answers); embedded mode
    # calls both in process.
    user_url: str = "http://127.0.0.1:8001"
    inference_url: str = "http://127.0.0.1:8003"
    # The data service (documents imported from dataset versions).
    data_url: str = "http://127.0.0.1:8002"
    # Milvus: a milvus-lite file (empty: <data_dir>/kb/milvus.db) or a Milvus server's URI
    # (http://host:19530) with its token.
    kb_milvus_uri: str = ""
    kb_milvus_token: str = ""
    # Retrieval and answers keep a knowledge base's row (settings, access list) per replica for
    # this long: a query costs one database round trip less. Changes made through this replica
    # apply at once; through another one, within this time. 0: read it every time.
    kb_lookup_cache_s: float = Field(default=1.0, ge=0, le=60)
    # Largest document accepted (upload or dataset import).
    kb_max_document_bytes: int = Field(default=100 << 20, gt=0)
    # Chunks embedded per call to the inference service.
    kb_embed_batch: int = Field(default=64, ge=1, le=2048)
    # Documents ingested at the same time by one replica of the service.
    kb_ingest_concurrency: int = Field(default=2, ge=1, le=64)
    # A replica holds a document it ingests for this long and renews the hold while it works;
    # a document whose hold ran out (its replica died) is taken up by another.
    kb_lease_s: float = Field(default=30.0, gt=0)
    # How often the ingestion loop looks for queued documents when nothing woke it.
    kb_poll_interval_s: float = Field(default=1.0, gt=0)
    # How often knowledge bases with a daily or weekly update strategy are checked.
    kb_refresh_check_s: float = Field(default=300.0, gt=0)
    # Failed ingestions of one document are retried this many times (transient errors only).
    kb_max_attempts: int = Field(default=3, ge=1)
