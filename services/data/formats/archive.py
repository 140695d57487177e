"""Zip archives: entry safety checks (paths, links, nesting, zip bombs), bounded extraction and
the analysis of each data member."""

from __future__ import annotations

import re
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Protocol

from services.data.formats.common import (
    _CHUNK,
    _EXTENSIONS,
    _RATIO_FLOOR,
    CONTENT_TYPES,
    Analysis,
    FormatError,
    ZipLimits,
)
from services.data.formats.detection import detect_format


class _Analyze(Protocol):
    """`analyze`, passed in by the package: it handles zips by calling this module."""

    def __call__(self, path: Path, fmt: str, *, preview_rows: int,
                 max_json_bytes: int) -> Analysis: ...


def _unsafe(message: str, name: str) -> FormatError:
    return FormatError(message, location={"member": name}, code="unsafe_archive")


def _check_entry(info: zipfile.ZipInfo, limits: ZipLimits) -> None:
    name = info.filename
    if "\\" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in (
            name.split("/")):
        raise _unsafe(f"the zip entry '{name}' points outside the archive (absolute path, '..', "
                      "drive letter or backslash)", name)
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        raise _unsafe(f"the zip entry '{name}' is a symbolic link", name)
    if name.lower().endswith(".zip"):
        raise _unsafe(f"the zip entry '{name}' is a zip; nested archives are not supported", name)
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _RATIO_FLOOR and ratio > limits.max_ratio:
        raise _unsafe(f"the zip entry '{name}' expands {ratio:,.0f} times, over the limit of "
                      f"{limits.max_ratio:,.0f} (a zip bomb?)", name)
    if info.flag_bits & 0x1:
        raise FormatError(f"the zip entry '{name}' is encrypted", location={"member": name})


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limits: ZipLimits,
             used: int) -> int:
    """Copy a member out, counting the bytes it really expands to: declared sizes can lie."""
    name, written = info.filename, 0
    errors = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
              ValueError, OSError)
    try:
        src = zf.open(info)
    except errors as e:
        raise FormatError(f"zip member '{name}' cannot be read: {e}",
                          location={"member": name}) from None
    with src, target.open("wb") as dst:
        while True:
            try:
                chunk = src.read(_CHUNK)
            except errors as e:
                raise FormatError(f"zip member '{name}' is corrupt: {e}",
                                  location={"member": name}) from None
            if not chunk:
                return written
            written += len(chunk)
            if written > info.file_size:
                raise _unsafe(f"zip member '{name}' is larger than its declared size", name)
            if used + written > limits.max_total_uncompressed:
                raise _unsafe("the zip archive expands past the limit of "
                              f"{limits.max_total_uncompressed:,} bytes", name)
            if written > _RATIO_FLOOR and written > limits.max_ratio * max(info.compress_size, 1):
                raise _unsafe(f"zip member '{name}' expands more than {limits.max_ratio:,.0f} "
                              "times (a zip bomb?)", name)
            dst.write(chunk)


def _analyze_zip(path: Path, preview_rows: int, limits: ZipLimits, max_json_bytes: int,
                 analyze: _Analyze) -> Analysis:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise FormatError(f"not a valid zip archive: {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise FormatError(f"the zip archive has {len(infos):,} entries, over the limit of "
                              f"{limits.max_members:,}", code="unsafe_archive")
        for info in infos:
            _check_entry(info, limits)
        if (declared := sum(i.file_size for i in infos)) > limits.max_total_uncompressed:
            raise FormatError(f"the zip archive expands to {declared:,} bytes, over the limit of "
                              f"{limits.max_total_uncompressed:,}", code="unsafe_archive")
        data = [i for i in infos if not i.is_dir() and not i.filename.startswith("__MACOSX/")
                and i.filename.rsplit("/", 1)[-1] != ".DS_Store"]  # macOS zip droppings
        members: list[dict[str, Any]] = []
        first: Analysis | None = None
        used = 0
        # Next to the upload rather than in /tmp, which may be a small RAM disk.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".unzip-") as tmp:
            for index, info in enumerate(data):
                name, suffix = info.filename, Path(info.filename).suffix.lower()
                if suffix and _EXTENSIONS.get(suffix) in (None, "zip"):
                    raise FormatError(f"zip member '{name}' has an unsupported file type "
                                      f"({suffix})", location={"member": name},
                                      code="unsupported_type")
                target = Path(tmp) / f"member-{index}"  # never a path made from the name
                size = _extract(zf, info, target, limits, used)
                used += size
                try:
                    fmt = detect_format(target, name)
                    if fmt == "zip":
                        raise _unsafe(f"zip member '{name}' is a zip; nested archives are not "
                                      "supported", name)
                    result = analyze(target, fmt, preview_rows=preview_rows,
                                     max_json_bytes=max_json_bytes)
                except FormatError as e:
                    raise FormatError(f"zip member '{name}': {e.message}", code=e.code,
                                      location={"member": name, **e.location}) from None
                finally:
                    target.unlink(missing_ok=True)
                first = first or result
                members.append({"name": name, "format": fmt, "size": size,
                                "row_count": result.row_count, "schema": result.schema})
    if first is None:
        raise FormatError("the zip archive has no data files", code="empty_file")
    return Analysis(format="zip", content_type=CONTENT_TYPES["zip"], schema=first.schema,
                    row_count=sum(m["row_count"] for m in members), stats=first.stats,
                    preview=first.preview, members=members)
