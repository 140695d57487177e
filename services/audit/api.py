"""HTTP routes of the audit service."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from services.audit import schemas as sch
from services.audit.service import AuditService, Filters, record_view
from workbench.db import utcnow
from workbench.deps import SessionDep
from workbench.identity.deps import require
from workbench.identity.principal import Principal
from workbench.problems import PROBLEM_RESPONSES
from workbench.schemas import CursorQuery, LimitQuery, Page

router = APIRouter(prefix="/api/v1/audit", tags=["audit"], responses=PROBLEM_RESPONSES)
Reader = Annotated[Principal, require("audit:read")]
Manager = Annotated[Principal, require("audit:manage")]


def svc(request: Request) -> AuditService:
    service: AuditService = request.app.state.audit_service
    return service


def filters_dep(
    actor: Annotated[str | None, Query(max_length=200, description="e.g. user:<id>")] = None,
    action: Annotated[str | None, Query(max_length=40, description="create, login, …")] = None,
    resource_type: Annotated[str | None, Query(max_length=100)] = None,
    resource_id: Annotated[str | None, Query(max_length=300)] = None,
    event_type: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[datetime | None, Query(description="inclusive, RFC 3339")] = None,
    until: Annotated[datetime | None, Query(description="exclusive, RFC 3339")] = None,
    q: Annotated[str | None, Query(min_length=2, max_length=200,
                                   description="free text within details")] = None,
) -> Filters:
    return Filters(actor=actor, action=action, resource_type=resource_type,
                   resource_id=resource_id, event_type=event_type, since=since, until=until,
                   q=q)


FiltersDep = Annotated[Filters, Depends(filters_dep)]


@router.get("/records", response_model=Page[sch.AuditRecordRead],
            summary="Search audit records (newest first)")
async def search(p: Reader, s: SessionDep, request: Request, filters: FiltersDep,
                 limit: LimitQuery = 50, cursor: CursorQuery = None) -> Any:
    rows, nxt = await svc(request).search(s, p, filters, limit=limit, cursor=cursor)
    return {"items": [record_view(r) for r in rows], "next_cursor": nxt}


@router.get("/records/{record_id}", response_model=sch.AuditRecordRead,
            summary="One audit record")
async def get_record(record_id: uuid.UUID, p: Reader, s: SessionDep, request: Request) -> Any:
    return record_view(await svc(request).get(s, p, record_id))


@router.get("/export", summary="Export matching records as CSV or JSON Lines (streamed)",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}},
                             "description": "The records, oldest first"}})
async def export(p: Reader, s: SessionDep, request: Request, filters: FiltersDep,
                 format: Literal["csv", "jsonl"] = "jsonl") -> StreamingResponse:
    service = svc(request)
    await service.events.export_created(s, p, format, filters.as_strings())
    media = "text/csv" if format == "csv" else "application/x-ndjson"
    name = f"audit-{utcnow():%Y%m%dT%H%M%S}.{format}"
    return StreamingResponse(service.export(p, filters, format), media_type=media,
                             headers={"content-disposition": f'attachment; filename="{name}"'})


@router.get("/verify", response_model=sch.VerifyResult,
            summary="Re-walk the organization's hash chain and report the first broken link")
async def verify(p: Reader, s: SessionDep, request: Request) -> Any:
    return await svc(request).verify(s, str(p.org_id))


@router.get("/summary", response_model=sch.Summary,
            summary="Compliance summary of a period (default: the last 30 days)")
async def summary(p: Reader, s: SessionDep, request: Request,
                  since: datetime | None = None, until: datetime | None = None) -> Any:
    end = until or utcnow()
    start = since or end - timedelta(days=30)
    Filters(since=start, until=end)  # validates the order
    return await svc(request).summary(s, p, start, end)


@router.get("/retention", response_model=sch.RetentionPolicyRead,
            summary="The organization's retention policy")
async def get_retention(p: Reader, s: SessionDep, request: Request) -> Any:
    policy = await svc(request).get_retention(s, p)
    return {"org_id": p.org_id, "days": policy.days if policy else None,
            "last_run_at": policy.last_run_at if policy else None}


@router.put("/retention", response_model=sch.RetentionPolicyRead,
            summary="Set how many days records stay in the database before archiving")
async def put_retention(body: sch.RetentionPolicyWrite, p: Manager, s: SessionDep,
                        request: Request) -> Any:
    service = svc(request)
    policy = await service.set_retention(s, p, body.days)
    await service.events.retention_updated(s, p, body.days)
    return {"org_id": p.org_id, "days": policy.days, "last_run_at": policy.last_run_at}


@router.post("/retention/run", response_model=sch.ArchiveRead | None,
             summary="Apply the retention policy now; returns the archive written, if any")
async def run_retention(p: Manager, request: Request) -> Any:
    return await svc(request).apply_policy(p.org_id, actor=p.actor)


@router.get("/archives", response_model=list[sch.ArchiveRead],
            summary="Archives written by retention (the chain continues from the last one)")
async def archives(p: Reader, s: SessionDep, request: Request) -> Any:
    return await svc(request).list_archives(s, p)
