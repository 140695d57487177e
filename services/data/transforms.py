"""Scans and transforms of a version's rows: the PII scan (findings per column, kept on the
version) and masking, which writes a new, derived version (redacted, partially masked, or
hashed with the org's salt) whose lineage names the version it came from."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from services.data import formats, pii
from services.data.models import DatasetVersion
from services.data.service import (
    ANALYSIS_SLOTS,
    DataService,
    NewVersion,
    VersionRepo,
    format_problem,
    require_not_zip,
)
from workbench.db import utcnow
from workbench.errors import Conflict, ValidationFailed
from workbench.identity.principal import Principal
from workbench.storage import file_sha256

T = TypeVar("T")


class Transforms:
    def __init__(self, service: DataService) -> None:
        self.service = service
        self.db = service.db

    async def _version(self, p: Principal, dataset_id: uuid.UUID, number: int,
                       what: str) -> DatasetVersion:
        async with self.db.transaction() as s:
            v = await self.service.get_version(s, p, dataset_id, number)
        require_not_zip(v, what)
        return v

    async def _on_rows(self, v: DatasetVersion, work: Callable[[Path], T]) -> T:
        """Run `work(local copy of the version)` in a worker thread; the copy is removed."""
        tmp = self.service._tmp_path("rows")
        try:
            await self.service.blobs.fetch(v, tmp)
            try:
                return await anyio.to_thread.run_sync(work, tmp, limiter=ANALYSIS_SLOTS)
            except formats.FormatError as exc:
                raise format_problem(exc, v.filename) from exc
        finally:
            tmp.unlink(missing_ok=True)

    async def scan(self, p: Principal, dataset_id: uuid.UUID, number: int) -> dict[str, Any]:
        """Scan every row of the version; the report is kept on the version and announced."""
        v = await self._version(p, dataset_id, number, "the PII scan")

        def run(path: Path) -> tuple[int, list[pii.ColumnFindings]]:
            scanner = pii.Scanner()
            for batch in formats.iter_batches(path, v.format):
                scanner.scan(batch)
            return scanner.rows_scanned, scanner.report()

        rows, findings = await self._on_rows(v, run)
        totals: dict[str, int] = {}
        for f in findings:
            for kind, n in f.kinds.items():
                totals[kind] = totals.get(kind, 0) + n
        report = {
            "version_id": str(v.id), "number": v.number, "rows_scanned": rows,
            "scanned_at": utcnow().isoformat().replace("+00:00", "Z"),
            "totals": totals,
            "columns": [{"column": f.column, "kinds": f.kinds,
                         "values_scanned": f.values_scanned, "examples": f.examples,
                         "name_column": f.name_column} for f in findings],
        }
        async with self.db.transaction() as s:
            row = await VersionRepo(s, p.org_id).get(v.id)
            row.pii_report = report
            await self.service.events.pii_scan_completed(s, row, rows, totals, p.actor)
        return report

    async def mask(self, p: Principal, dataset_id: uuid.UUID, number: int, *, strategy: str,
                   columns: list[dict[str, Any]] | None, note: str) -> DatasetVersion:
        """A new version of the same dataset with PII masked. Without `columns`, what the
        version's PII scan found is masked (the scan runs first if there is none)."""
        v = await self._version(p, dataset_id, number, "masking")
        names = [c["name"] for c in v.schema]
        if columns:
            rules = []
            for c in columns:
                if c["column"] not in names:
                    raise ValidationFailed(
                        f"version {number} has no column {c['column']!r} (columns: "
                        f"{', '.join(names)})", code="unknown_column",
                        extra={"field": "columns", "column": c["column"]})
                rules.append(pii.MaskRule(column=c["column"],
                                          strategy=c.get("strategy") or strategy,
                                          whole_value=bool(c.get("whole_value"))))
        else:
            report = v.pii_report or await self.scan(p, dataset_id, number)
            findings = [pii.ColumnFindings(
                column=c["column"], kinds=c["kinds"], values_scanned=c["values_scanned"],
                examples=c["examples"], name_column=c["name_column"])
                for c in report["columns"]]
            if not findings:
                raise Conflict(f"the PII scan of version {number} found nothing to mask; name "
                               "the columns to mask explicitly", code="nothing_to_mask")
            rules = pii.rules_from_findings(findings, strategy)
        salt = await self.service.blobs.mask_salt(p.org_id)
        out = self.service._tmp_path("masked")

        def run(path: Path) -> tuple[int, str]:
            return _write_transformed(path, v.format, out,
                                      lambda b: pii.mask_batch(b, rules, salt=salt))

        try:
            size, digest = await self._on_rows(v, run)
            return await self.service.add_version(p, dataset_id, NewVersion(
                path=out, size=size, sha256=digest, filename=v.filename,
                declared_format=v.format, note=note or f"masked ({strategy}) from v{number}",
                parents=[v.id], transform={
                    "type": "mask", "strategy": strategy, "source_version": number,
                    "rules": [{"column": r.column, "strategy": r.strategy,
                               "whole_value": r.whole_value,
                               "kinds": list(r.kinds) if r.kinds else None} for r in rules]}))
        finally:
            out.unlink(missing_ok=True)


def _write_transformed(src: Path, fmt: str, dest: Path,
                       change: Callable[[Any], Any]) -> tuple[int, str]:
    """Rows of `src` through `change`, written as `fmt` to `dest`; (size, sha256) of dest."""
    writer: formats.BatchWriter | None = None
    try:
        for batch in formats.iter_batches(src, fmt):
            changed = change(batch)
            if writer is None:
                writer = formats.BatchWriter(dest, fmt, changed.schema)
            writer.write(changed)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValidationFailed("the version has no rows to transform", code="no_rows")
    return dest.stat().st_size, file_sha256(dest)

