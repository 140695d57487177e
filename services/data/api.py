"""HTTP routes of the data service: datasets, versions (upload, download, preview, lineage),
resumable uploads, PII scan and masking, annotation tasks."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, BackgroundTasks, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from services.data import formats
from services.data import schemas as sch
from services.data.annotations import Annotations
from services.data.service import DataService, NewVersion
from services.data.transforms import Transforms
from services.data.uploads import Uploads
from workbench.deps import SessionDep
from workbench.errors import BadRequest, NotFound, PayloadTooLarge, WorkbenchError
from workbench.identity.deps import require
from workbench.identity.principal import Principal, Role
from workbench.internal import InternalDep, principal_on_behalf
from workbench.problems import PROBLEM_RESPONSES, problem_response
from workbench.receive import Received, receive_multipart, receive_raw
from workbench.schemas import CursorQuery, LimitQuery, Page

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"], responses=PROBLEM_RESPONSES)
Reader = Annotated[Principal, require("data:read")]
Writer = Annotated[Principal, require("data:write")]
Deleter = Annotated[Principal, require("data:delete")]
Number = Annotated[int, Path(ge=1, description="Version number (1, 2, …)")]


def svc(request: Request) -> DataService:
    service: DataService = request.app.state.data_service
    return service


def uploads(request: Request) -> Uploads:
    u: Uploads = request.app.state.data_uploads
    return u


def transforms(request: Request) -> Transforms:
    t: Transforms = request.app.state.data_transforms
    return t


def annotations(request: Request) -> Annotations:
    a: Annotations = request.app.state.data_annotations
    return a


# ---- datasets ---------------------------------------------------------------------------------

@router.post("", status_code=201, response_model=sch.DatasetRead, summary="Create a dataset")
async def create_dataset(body: sch.DatasetCreate, p: Writer, s: SessionDep,
                         request: Request) -> Any:
    return await svc(request).create_dataset(
        s, p, project_id=body.project_id, name=body.name, description=body.description,
        tags=body.tags, sensitive=body.sensitive)


@router.get("", response_model=Page[sch.DatasetRead], summary="List datasets")
async def list_datasets(
    p: Reader, s: SessionDep, request: Request,
    project_id: Annotated[uuid.UUID | None, Query()] = None,
    q: Annotated[str | None, Query(min_length=1, max_length=200,
                                   description="In name or description")] = None,
    tag: Annotated[str | None, Query(max_length=50)] = None,
    format: Annotated[sch.Format | None, Query(description="Of the latest version")] = None,
    deleted: Annotated[bool, Query(description="List deleted (restorable) datasets")] = False,
    limit: LimitQuery = 50, cursor: CursorQuery = None,
) -> Any:
    items, nxt = await svc(request).list_datasets(
        s, p, project_id=project_id, q=q, tag=tag, fmt=format, deleted=deleted, limit=limit,
        cursor=cursor)
    return {"items": items, "next_cursor": nxt}


@router.get("/{dataset_id}", response_model=sch.DatasetRead, summary="Get a dataset")
async def get_dataset(dataset_id: uuid.UUID, p: Reader, s: SessionDep, request: Request) -> Any:
    return await svc(request).get_dataset(s, p, dataset_id)


@router.patch("/{dataset_id}", response_model=sch.DatasetRead,
              summary="Update a dataset (flagging it sensitive encrypts its versions)")
async def update_dataset(dataset_id: uuid.UUID, body: sch.DatasetUpdate, p: Writer,
                         s: SessionDep, request: Request, background: BackgroundTasks) -> Any:
    changes = body.model_dump(exclude_unset=True)
    service = svc(request)
    d = await service.update_dataset(s, p, dataset_id, changes)
    if changes.get("sensitive"):
        # After the commit: existing plaintext versions are re-stored encrypted (each
        # version's `encrypted` shows the progress; the sweep finishes an interrupted run).
        background.add_task(service.encrypt_existing_versions, p.org_id, dataset_id)
    return d


@router.delete("/{dataset_id}", status_code=204,
               summary="Delete a dataset (restorable until it is purged)")
async def delete_dataset(dataset_id: uuid.UUID, p: Deleter, s: SessionDep,
                         request: Request) -> Response:
    await svc(request).delete_dataset(s, p, dataset_id)
    return Response(status_code=204)


@router.post("/{dataset_id}/restore", response_model=sch.DatasetRead,
             summary="Restore a deleted dataset")
async def restore_dataset(dataset_id: uuid.UUID, p: Deleter, s: SessionDep,
                          request: Request) -> Any:
    return await svc(request).restore_dataset(s, p, dataset_id)


@router.post("/{dataset_id}/purge", status_code=204,
             summary="Purge a deleted dataset now: files removed, storage released")
async def purge_dataset(dataset_id: uuid.UUID, p: Deleter, request: Request) -> Response:
    await svc(request).purge_dataset(p.org_id, dataset_id, actor=p.actor)
    return Response(status_code=204)


# ---- versions ---------------------------------------------------------------------------------

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "note": {"type": "string", "description": "Change note"},
                    "format": {"type": "string", "enum": list(formats.FORMATS),
                               "description": "Omit to detect from the content"}}}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                         "example": "id,name\n1,Ada\n"},
        },
    }
}


@router.post("/{dataset_id}/versions", status_code=201, response_model=sch.VersionRead,
             summary="Upload a file as the next version (multipart or raw body, streamed)",
             openapi_extra=_UPLOAD_BODY)
async def upload_version(
    dataset_id: uuid.UUID, p: Writer, request: Request,
    filename: Annotated[str | None, Query(max_length=300,
                                          description="Raw bodies: the file's name")] = None,
    format: Annotated[sch.Format | None, Query(description="Omit to detect")] = None,
    note: Annotated[str, Query(max_length=2000)] = "",
) -> Any:
    service = svc(request)
    settings = service.settings
    async with service.db.transaction() as s:
        await service.get_dataset(s, p, dataset_id)  # 404 before a byte is read
    length = _content_length(request)
    if length is not None and length > settings.data_max_upload_bytes + (1 << 20):
        raise PayloadTooLarge(f"the body is {length:,} bytes; the largest upload is "
                              f"{settings.data_max_upload_bytes:,} bytes",
                              extra={"limit": settings.data_max_upload_bytes})
    reserved = length or 0
    await service.users.reserve_storage(p.org_id, reserved)
    received: Received | None = None
    try:
        received = await _receive(request, service)
        fmt = received.fields.get("format") or format
        if fmt is not None and fmt not in formats.FORMATS:
            raise BadRequest(f"format {fmt!r} is not one of {', '.join(formats.FORMATS)}",
                             code="unknown_format", extra={"field": "format"})
        return await service.add_version(p, dataset_id, NewVersion(
            path=received.path, size=received.size, sha256=received.sha256,
            filename=received.filename or filename or "", declared_format=fmt,
            note=received.fields.get("note", note)[:2000], reserved=reserved))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await service.users.release_storage(p.org_id, reserved)
        raise
    finally:
        if received is not None:
            received.path.unlink(missing_ok=True)


async def _receive(request: Request, service: DataService) -> Received:
    content_type = request.headers.get("content-type", "")
    limit = service.settings.data_max_upload_bytes
    too_large = f"the file is larger than the largest upload ({limit:,} bytes)"
    folder = service.settings.tmp_dir()
    if content_type.startswith("multipart/form-data"):
        return await receive_multipart(request.stream(), content_type, folder, limit=limit,
                                       too_large=too_large)
    return await receive_raw(request.stream(), folder, limit=limit, too_large=too_large)


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest("Content-Length is not a number") from exc
    return value if value >= 0 else None


@router.get("/{dataset_id}/versions", response_model=Page[sch.VersionRead],
            summary="List a dataset's versions (oldest first)")
async def list_versions(dataset_id: uuid.UUID, p: Reader, s: SessionDep, request: Request,
                        limit: LimitQuery = 50, cursor: CursorQuery = None) -> Any:
    items, nxt = await svc(request).list_versions(s, p, dataset_id, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": nxt}


@router.get("/{dataset_id}/versions/{number}", response_model=sch.VersionRead,
            summary="A version: schema, row count, per-column stats, checksum")
async def get_version(dataset_id: uuid.UUID, number: Number, p: Reader, s: SessionDep,
                      request: Request) -> Any:
    return await svc(request).get_version(s, p, dataset_id, number)


@router.get("/{dataset_id}/versions/{number}/preview", response_model=sch.PreviewPage,
            summary="A page of the version's first rows")
async def preview(dataset_id: uuid.UUID, number: Number, p: Reader, s: SessionDep,
                  request: Request,
                  offset: Annotated[int, Query(ge=0, le=1000)] = 0,
                  limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Any:
    v = await svc(request).get_version(s, p, dataset_id, number)
    return {"number": v.number, "offset": offset, "rows": v.preview[offset:offset + limit],
            "kept": len(v.preview), "row_count": v.row_count}


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range of RFC 9110 (`bytes=a-b`, `bytes=a-`, `bytes=-n`); None for the whole
    file (no header, or several ranges, which may be answered whole)."""
    if not header or "," in header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable(size)
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:
        start, end = max(0, size - int(m.group(2))), size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(size)
    return start, end


class RangeNotSatisfiable(WorkbenchError):
    status = 416
    code = "range_not_satisfiable"
    title = "Range not satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(f"the range is outside the file's {size:,} bytes",
                         headers={"content-range": f"bytes */{size}"}, extra={"size": size})


@router.get("/{dataset_id}/versions/{number}/download",
            summary="Download a version's file (streamed; single byte ranges supported)",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "The whole file"},
                       206: {"description": "The requested byte range"},
                       416: problem_response("The range is outside the file")})
async def download(dataset_id: uuid.UUID, number: Number, p: Reader, request: Request,
                   range: Annotated[str | None, Header(description="bytes=START-END")] = None,
                   ) -> StreamingResponse:
    service = svc(request)
    async with service.db.transaction() as s:
        v = await service.get_version(s, p, dataset_id, number)
    span = parse_range(range, v.size_bytes)
    await service.record_download(p, v, range if span and range else "")
    start, end = span or (0, v.size_bytes - 1)
    headers = {"accept-ranges": "bytes", "etag": f'"{v.sha256}"',
               "content-length": str(max(0, end - start + 1)),
               "content-disposition": f'attachment; filename="{v.filename}"',
               "x-checksum-sha256": v.sha256}
    if span:
        headers["content-range"] = f"bytes {start}-{end}/{v.size_bytes}"
    return StreamingResponse(service.blobs.read(v, start, end), status_code=206 if span else 200,
                             media_type=v.content_type, headers=headers)


@router.get("/{dataset_id}/lineage", response_model=sch.Lineage,
            summary="The lineage graph around a dataset's versions")
async def lineage(dataset_id: uuid.UUID, p: Reader, s: SessionDep, request: Request) -> Any:
    return await svc(request).lineage(s, p, dataset_id)


# ---- PII --------------------------------------------------------------------------------------

@router.post("/{dataset_id}/versions/{number}/pii-scan", response_model=sch.PiiReport,
             summary="Scan a version for personal data (findings per column)")
async def pii_scan(dataset_id: uuid.UUID, number: Number, p: Writer, request: Request) -> Any:
    return await transforms(request).scan(p, dataset_id, number)


@router.get("/{dataset_id}/versions/{number}/pii-scan", response_model=sch.PiiReport,
            summary="The version's last PII scan")
async def pii_report(dataset_id: uuid.UUID, number: Number, p: Reader, s: SessionDep,
                     request: Request) -> Any:
    v = await svc(request).get_version(s, p, dataset_id, number)
    if v.pii_report is None:
        raise NotFound(f"version {number} has not been scanned; POST to this path to scan it",
                       code="not_scanned")
    return v.pii_report


@router.post("/{dataset_id}/versions/{number}/mask", status_code=201,
             response_model=sch.VersionRead,
             summary="Mask personal data into a new, derived version")
async def mask(dataset_id: uuid.UUID, number: Number, body: sch.MaskRequest, p: Writer,
               request: Request) -> Any:
    return await transforms(request).mask(
        p, dataset_id, number, strategy=body.strategy,
        columns=[c.model_dump() for c in body.columns] if body.columns else None,
        note=body.note)


# ---- resumable uploads ------------------------------------------------------------------------

@router.post("/{dataset_id}/uploads", status_code=201, response_model=sch.UploadRead,
             summary="Open a resumable upload (the file's size is reserved from the quota)")
async def start_upload(dataset_id: uuid.UUID, body: sch.UploadCreate, p: Writer,
                       s: SessionDep, request: Request) -> Any:
    return await uploads(request).start(s, p, dataset_id, filename=body.filename,
                                        size=body.size, fmt=body.format, note=body.note)


@router.get("/{dataset_id}/uploads/{upload_id}", response_model=sch.UploadRead,
            summary="Where a resumable upload stands (`received` is the next offset)")
async def get_upload(dataset_id: uuid.UUID, upload_id: uuid.UUID, p: Writer, s: SessionDep,
                     request: Request) -> Any:
    return await uploads(request).get(s, p, dataset_id, upload_id)


@router.put("/{dataset_id}/uploads/{upload_id}", response_model=sch.UploadRead,
            summary="Send the next chunk (raw body) at `Upload-Offset`",
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}}}}})
async def put_chunk(dataset_id: uuid.UUID, upload_id: uuid.UUID, p: Writer, request: Request,
                    upload_offset: Annotated[int, Header(
                        ge=0, description="Byte offset of this chunk; must equal `received`")],
                    ) -> Any:
    return await uploads(request).put_chunk(p, dataset_id, upload_id, offset=upload_offset,
                                            body=request.stream())


@router.post("/{dataset_id}/uploads/{upload_id}/complete", status_code=201,
             response_model=sch.VersionRead,
             summary="Finish a resumable upload into the next version")
async def complete_upload(dataset_id: uuid.UUID, upload_id: uuid.UUID,
                          body: sch.UploadComplete, p: Writer, request: Request) -> Any:
    return await uploads(request).complete(p, dataset_id, upload_id, note=body.note)


@router.delete("/{dataset_id}/uploads/{upload_id}", status_code=204,
               summary="Cancel a resumable upload (its parts are removed)")
async def cancel_upload(dataset_id: uuid.UUID, upload_id: uuid.UUID, p: Writer,
                        request: Request) -> Response:
    await uploads(request).cancel(p, dataset_id, upload_id)
    return Response(status_code=204)


# ---- annotation tasks -------------------------------------------------------------------------

@router.post("/{dataset_id}/annotation-tasks", status_code=201, response_model=sch.TaskRead,
             summary="Create a labelling task on a version")
async def create_task(dataset_id: uuid.UUID, body: sch.TaskCreate, p: Writer, s: SessionDep,
                      request: Request) -> Any:
    return await annotations(request).create_task(
        s, p, dataset_id, version=body.version, name=body.name, labels=body.labels,
        instructions=body.instructions, assignee_id=body.assignee_id)


@router.get("/{dataset_id}/annotation-tasks", response_model=Page[sch.TaskRead],
            summary="List a dataset's labelling tasks")
async def list_tasks(dataset_id: uuid.UUID, p: Reader, s: SessionDep, request: Request,
                     status: Annotated[str | None, Query(
                         pattern="^(pending|in_progress|completed)$")] = None,
                     assignee_id: uuid.UUID | None = None,
                     limit: LimitQuery = 50, cursor: CursorQuery = None) -> Any:
    items, nxt = await annotations(request).list_tasks(
        s, p, dataset_id, status=status, assignee_id=assignee_id, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": nxt}


@router.get("/{dataset_id}/annotation-tasks/{task_id}", response_model=sch.TaskRead,
            summary="A labelling task and its progress")
async def get_task(dataset_id: uuid.UUID, task_id: uuid.UUID, p: Reader, s: SessionDep,
                   request: Request) -> Any:
    return await annotations(request).get_task(s, p, dataset_id, task_id)


@router.patch("/{dataset_id}/annotation-tasks/{task_id}", response_model=sch.TaskRead,
              summary="Assign, rename or change the status of a labelling task")
async def update_task(dataset_id: uuid.UUID, task_id: uuid.UUID, body: sch.TaskUpdate,
                      p: Writer, s: SessionDep, request: Request) -> Any:
    return await annotations(request).update_task(s, p, dataset_id, task_id,
                                                  body.model_dump(exclude_unset=True))


@router.put("/{dataset_id}/annotation-tasks/{task_id}/labels", response_model=sch.TaskRead,
            summary="Label rows (up to 5,000 per call; a row labelled again is relabelled)")
async def set_labels(dataset_id: uuid.UUID, task_id: uuid.UUID, body: sch.LabelsSet,
                     p: Writer, s: SessionDep, request: Request) -> Any:
    return await annotations(request).set_labels(
        s, p, dataset_id, task_id, [(i.row, i.label) for i in body.items])


@router.get("/{dataset_id}/annotation-tasks/{task_id}/labels", response_model=sch.LabelPage,
            summary="The task's labels, by row")
async def list_labels(dataset_id: uuid.UUID, task_id: uuid.UUID, p: Reader, s: SessionDep,
                      request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 200,
                      cursor: CursorQuery = None) -> Any:
    after: int | None = None
    if cursor:
        try:
            after = int(cursor)
        except ValueError as exc:
            raise BadRequest("cursor is not valid; pass back next_cursor",
                             code="invalid_cursor") from exc
    rows, nxt = await annotations(request).list_labels(s, p, dataset_id, task_id,
                                                       after_row=after, limit=limit)
    return {"items": rows, "next_cursor": str(nxt) if nxt is not None else None}


@router.post("/{dataset_id}/annotation-tasks/{task_id}/export", status_code=201,
             response_model=sch.VersionRead,
             summary="Export the labelled rows as a new version (source columns + `label`)")
async def export_labels(dataset_id: uuid.UUID, task_id: uuid.UUID, body: sch.ExportRequest,
                        p: Writer, request: Request) -> Any:
    return await annotations(request).export(p, dataset_id, task_id,
                                             only_labelled=body.only_labelled, note=body.note)


# ---- internal: other services (the kb service imports dataset versions as documents) ------------

internal = APIRouter(prefix="/internal/v1/orgs/{org_id}/datasets", tags=["internal"],
                     include_in_schema=False, dependencies=[InternalDep])


async def _internal_version(request: Request, org_id: uuid.UUID, dataset_id: uuid.UUID,
                            which: str, user: str | None) -> tuple[Principal, Any]:
    service, p = svc(request), principal_on_behalf(org_id, user, Role.VIEWER)
    async with service.db.transaction() as s:
        if which == "latest":
            d = await service.get_dataset(s, p, dataset_id)
            if not d.latest_version:
                raise NotFound(f"dataset {dataset_id} has no version yet")
            number = d.latest_version
        elif which.isdigit() and int(which) >= 1:
            number = int(which)
        else:
            raise BadRequest("version is a number (1, 2, …) or 'latest'")
        return p, await service.get_version(s, p, dataset_id, number)


@internal.get("/{dataset_id}/versions/{which}")
async def internal_version(org_id: uuid.UUID, dataset_id: uuid.UUID, which: str,
                           request: Request,
                           x_wb_on_behalf_of: Annotated[str | None, Header()] = None) -> Any:
    _, v = await _internal_version(request, org_id, dataset_id, which, x_wb_on_behalf_of)
    return {"dataset_id": str(v.dataset_id), "number": v.number, "filename": v.filename,
            "format": v.format, "content_type": v.content_type, "size_bytes": v.size_bytes,
            "sha256": v.sha256}


@internal.get("/{dataset_id}/versions/{which}/content")
async def internal_version_content(org_id: uuid.UUID, dataset_id: uuid.UUID, which: str,
                                   request: Request,
                                   x_wb_on_behalf_of: Annotated[str | None, Header()] = None
                                   ) -> StreamingResponse:
    p, v = await _internal_version(request, org_id, dataset_id, which, x_wb_on_behalf_of)
    await svc(request).record_download(p, v, "")
    return StreamingResponse(svc(request).blobs.read(v), media_type=v.content_type,
                             headers={"content-length": str(v.size_bytes),
                                      "x-checksum-sha256": v.sha256})
