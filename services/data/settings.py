"""Settings of the data service."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from workbench.settings import ObjectStoreSettings, ServiceSettings


class DataSettings(ServiceSettings, ObjectStoreSettings):
    # Where the user service answers (projects, the org's storage quota); embedded mode calls it
    # in process.
    user_url: str = "http://127.0.0.1:8001"
    # Largest single file (upload or resumable upload), whatever the org's quota says.
    data_max_upload_bytes: int = Field(default=20 << 30, gt=0)
    # Uploads are received into this folder before they are checked and stored; it needs room
    # for the largest upload in flight. Default: <data_dir>/tmp/data-uploads.
    data_tmp_dir: Path | None = None
    # Largest chunk of a resumable upload (one PUT).
    data_max_chunk_bytes: int = Field(default=256 << 20, gt=0)
    # A resumable upload not completed within this long is removed with its parts.
    data_upload_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    # Soft-deleted datasets are purged (files removed, storage released) after this many days.
    data_purge_after_days: float = Field(default=7.0, ge=0)
    # How often expired uploads and due purges are swept.
    data_sweep_interval_s: float = Field(default=600.0, gt=0)
    # Rows kept as the preview of a version (the first N).
    data_preview_rows: int = Field(default=100, ge=1, le=1000)
    # A JSON (array) file is parsed whole; past this size use JSON Lines.
    data_max_json_bytes: int = Field(default=256 << 20, gt=0)
    # Zip archives: at most this many members and this many bytes once unpacked.
    data_zip_max_members: int = Field(default=1000, gt=0)
    data_zip_max_uncompressed_bytes: int = Field(default=8 << 30, gt=0)

    def tmp_dir(self) -> Path:
        return self.data_tmp_dir or self.data_dir / "tmp" / "data-uploads"
