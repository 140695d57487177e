"""HTTP routes of the kb service: knowledge bases, their documents (upload, import from a dataset
version, status, chunks, reindex, delete), ingestion progress, retrieval and RAG chat."""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import anyio.to_thread
import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from services.kb import parsing
from services.kb import schemas as sch
from services.kb.ingest import Ingestor
from services.kb.models import Chunk, KnowledgeBase
from services.kb.rag import Rag, cite
from services.kb.refresh import Refresher
from services.kb.service import KbService
from workbench.deps import SessionDep
from workbench.errors import BadRequest, PayloadTooLarge, ValidationFailed, WorkbenchError
from workbench.identity.deps import require
from workbench.identity.principal import Principal
from workbench.problems import PROBLEM_RESPONSES, problem_response
from workbench.receive import receive_multipart
from workbench.schemas import CursorQuery, LimitQuery, Page

router = APIRouter(prefix="/api/v1/kb", tags=["knowledge bases"], responses=PROBLEM_RESPONSES)
Reader = Annotated[Principal, require("kb:read")]
Writer = Annotated[Principal, require("kb:write")]
Deleter = Annotated[Principal, require("kb:delete")]
# Formats a knowledge base ingests (what `parsing` reads).
FORMATS = ("txt", "md", "html", "pdf", "docx", "csv", "jsonl", "json")


def svc(request: Request) -> KbService:
    service: KbService = request.app.state.kb_service
    return service


def _wake(request: Request) -> None:
    ingestor: Ingestor = request.app.state.kb_ingestor
    ingestor.wake.set()


# ---- knowledge bases ---------------------------------------------------------------------------

@router.post("", status_code=201, response_model=sch.KbRead,
             summary="Create a knowledge base (its embedding model is checked with one call)")
async def create_kb(body: sch.KbCreate, p: Writer, s: SessionDep, request: Request) -> Any:
    return await svc(request).create_kb(
        s, p, project_id=body.project_id, name=body.name, description=body.description,
        embedding_model=body.embedding_model, chat_model=body.chat_model,
        chunk_strategy=body.chunk_strategy, chunk_size=body.chunk_size,
        chunk_overlap=body.chunk_overlap, update_strategy=body.update_strategy,
        access=body.access.model_dump())


@router.get("", response_model=Page[sch.KbRead],
            summary="List the knowledge bases you can read")
async def list_kbs(p: Reader, s: SessionDep, request: Request,
                   project_id: Annotated[uuid.UUID | None, Query()] = None,
                   limit: LimitQuery = 50, cursor: CursorQuery = None) -> Any:
    rows, nxt = await svc(request).list_kbs(s, p, project_id=project_id, limit=limit,
                                            cursor=cursor)
    return {"items": rows, "next_cursor": nxt}


@router.get("/{kb_id}", response_model=sch.KbRead, summary="A knowledge base")
async def get_kb(kb_id: uuid.UUID, p: Reader, s: SessionDep, request: Request) -> Any:
    return await svc(request).get_kb(s, p, kb_id)


@router.patch("/{kb_id}", response_model=sch.KbRead,
              summary="Change a knowledge base's settings or access list")
async def update_kb(kb_id: uuid.UUID, body: sch.KbUpdate, p: Writer, s: SessionDep,
                    request: Request) -> Any:
    changes = body.model_dump(exclude_unset=True)
    return await svc(request).update_kb(s, p, kb_id, changes)


@router.delete("/{kb_id}", status_code=204,
               summary="Delete a knowledge base with its documents, chunks and vectors")
async def delete_kb(kb_id: uuid.UUID, p: Deleter, s: SessionDep, request: Request) -> Response:
    await svc(request).delete_kb(s, p, kb_id)
    return Response(status_code=204)


@router.get("/{kb_id}/status", response_model=sch.Progress,
            summary="Ingestion progress: documents and chunks done / total, failures")
async def status(kb_id: uuid.UUID, p: Reader, s: SessionDep, request: Request,
                 verify: Annotated[bool, Query(description=(
                     "Also count the vectors in Milvus: with nothing in flight they equal the "
                     "searchable chunks (no copies, nothing left over)"))] = False) -> Any:
    kb = await svc(request).get_kb(s, p, kb_id)
    out = await svc(request).progress(s, kb)
    if verify:
        out["searchable_chunks"] = kb.chunk_count
        out["vectors"] = await svc(request).vectors.count(kb.id, kb.org_id)
    return out


@router.post("/{kb_id}/refresh", response_model=sch.Progress,
             summary="Re-import every document that came from a dataset, if it changed")
async def refresh(kb_id: uuid.UUID, p: Writer, request: Request) -> Any:
    service = svc(request)
    async with service.db.transaction() as s:
        await service.get_kb(s, p, kb_id, write=True)
    refresher: Refresher = request.app.state.kb_refresher
    await refresher.refresh(p.org_id, kb_id, actor=p.actor)
    _wake(request)
    async with service.db.transaction() as s:
        kb = await service.get_kb(s, p, kb_id)
        return await service.progress(s, kb)


# ---- documents ---------------------------------------------------------------------------------

@router.post("/{kb_id}/documents", status_code=202, response_model=sch.DocumentAccepted,
             summary="Upload a document (multipart: `file`, optional `metadata` as JSON)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                    "properties": {
                     "file": {"type": "string", "format": "binary"},
                     "metadata": {"type": "string", "example": '{"team": "support"}'}}}}}}},
             responses={413: problem_response("Larger than the document limit"),
                        415: problem_response("Not a format a knowledge base reads")})
async def upload_document(kb_id: uuid.UUID, p: Writer, request: Request) -> Any:
    service = svc(request)
    settings = service.settings
    async with service.db.transaction() as s:
        kb = await service.get_kb(s, p, kb_id, write=True)
        s.expunge(kb)
    limit = settings.kb_max_document_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + (1 << 20):
        raise PayloadTooLarge(f"documents may have at most {limit:,} bytes",
                              code="document_too_large", extra={"limit": limit})
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest("upload the document as multipart/form-data with a 'file' part",
                         code="multipart_required")
    received = await receive_multipart(
        request.stream(), content_type, settings.data_dir / "tmp" / "kb-uploads",
        limit=limit, too_large=f"documents may have at most {limit:,} bytes")
    try:
        meta = _metadata(received.fields.get("metadata"))
        name = (received.fields.get("name") or received.filename or "").strip()
        if not name:
            raise ValidationFailed("the file part needs a file name", extra={"field": "file"})
        fmt = await _check_file(received.path, name, received.size)
        key = service.staging_key(p.org_id, kb.id)
        await service.store.put_file(key, received.path, sha256=received.sha256)
    finally:
        with contextlib.suppress(FileNotFoundError):
            received.path.unlink()
    return await _accept(request, p, kb, name=name, key=key, size=received.size,
                         sha256=received.sha256, fmt=fmt, meta=meta,
                         source={"type": "upload"})


def _metadata(raw: str | None) -> dict[str, Any] | None:
    if raw is None or not raw.strip():
        return None
    try:
        meta = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValidationFailed(f"metadata is not JSON: {exc}", extra={"field": "metadata"}
                               ) from exc
    if not isinstance(meta, dict) or len(meta) > 32:
        raise ValidationFailed("metadata is a JSON object of at most 32 fields",
                               extra={"field": "metadata"})
    for k, v in meta.items():
        ok = isinstance(v, str | int | float | bool) or (
            isinstance(v, list) and all(isinstance(x, str | int | float | bool) for x in v))
        if not ok or not k.replace("_", "").isalnum() or len(k) > 64:
            raise ValidationFailed(f"metadata field {k[:64]!r}: names are letters, digits and "
                                   "underscores; values are strings, numbers, booleans or "
                                   "lists of them", extra={"field": "metadata"})
    return dict(meta)


async def _check_file(path: Any, name: str, size: int) -> str:
    """Refuse at once what can never be ingested: an empty file, a format we do not read.
    A damaged file of a known format is a per-document error of the ingestion instead."""
    if size == 0:
        raise ValidationFailed(f"{name!r} is empty", code="empty_document",
                               extra={"field": "file"})
    async with await anyio.open_file(path, "rb") as f:
        head = await f.read(64 << 10)
    try:
        fmt = parsing.detect_format(name, head)
    except parsing.UnsupportedFormat as exc:
        raise UnsupportedMedia(str(exc)) from exc
    if fmt not in FORMATS:
        raise UnsupportedMedia(f"{name!r} is {fmt}; knowledge bases read "
                               f"{', '.join(FORMATS)}")
    return fmt


class UnsupportedMedia(WorkbenchError):
    status = 415
    code = "unsupported_format"
    title = "Unsupported document format"


async def _accept(request: Request, p: Principal, kb: KnowledgeBase, *, name: str, key: str,
                  size: int, sha256: str, fmt: str, meta: dict[str, Any] | None,
                  source: dict[str, Any]) -> Any:
    service = svc(request)
    try:
        async with service.db.transaction() as s:
            kb_row = await service.get_kb(s, p, kb.id, write=True)
            d, queued = await service.add_document(
                s, p, kb_row, name=name, object_key=key, size=size, sha256=sha256,
                content_type=_CONTENT_TYPES.get(fmt, "application/octet-stream"), fmt=fmt,
                meta=meta, source=source)
            await service.recount(s, kb_row)
            out = sch.DocumentAccepted.model_validate(d).model_dump()
    except BaseException:
        await service.store.delete(key)
        raise
    if queued:
        _wake(request)
    out["queued"] = queued
    return out


_CONTENT_TYPES = {"txt": "text/plain", "md": "text/markdown", "html": "text/html",
                  "pdf": "application/pdf", "csv": "text/csv", "jsonl": "application/jsonl",
                  "json": "application/json",
                  "docx": "application/vnd.openxmlformats-officedocument."
                          "wordprocessingml.document"}


@router.post("/{kb_id}/documents/import", status_code=202, response_model=sch.DocumentAccepted,
             summary="Import a dataset version of the data service as a document")
async def import_document(kb_id: uuid.UUID, body: sch.ImportRequest, p: Writer,
                          request: Request) -> Any:
    service = svc(request)
    async with service.db.transaction() as s:
        kb = await service.get_kb(s, p, kb_id, write=True)
        s.expunge(kb)
    info, data = await service.upstream.dataset_file(
        p.org_id, body.dataset_id, body.version, service.settings.kb_max_document_bytes)
    assert data is not None  # always downloaded without unless_sha256
    name = body.name or str(info["filename"])
    sha256 = await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
    try:
        fmt = parsing.detect_format(name, data[:64 << 10])
    except parsing.UnsupportedFormat as exc:
        raise UnsupportedMedia(str(exc)) from exc
    if not data:
        raise ValidationFailed(f"dataset version {info['number']} is empty",
                               code="empty_document")
    key = service.staging_key(p.org_id, kb.id)
    await service.store.put_bytes(key, data)
    return await _accept(request, p, kb, name=name, key=key, size=len(data), sha256=sha256,
                         fmt=fmt, meta=body.metadata or None,
                         source={"type": "dataset", "dataset_id": str(body.dataset_id),
                                 "version": int(info["number"]),
                                 "follow_latest": body.version is None})


@router.get("/{kb_id}/documents", response_model=Page[sch.DocumentRead],
            summary="List documents with their ingestion status")
async def list_documents(kb_id: uuid.UUID, p: Reader, s: SessionDep, request: Request,
                         status: Annotated[str | None, Query(
                             pattern="^(queued|processing|indexed|failed)$")] = None,
                         limit: LimitQuery = 50, cursor: CursorQuery = None) -> Any:
    kb = await svc(request).get_kb(s, p, kb_id)
    rows, nxt = await svc(request).list_documents(s, p, kb, status=status, limit=limit,
                                                  cursor=cursor)
    return {"items": rows, "next_cursor": nxt}


@router.get("/{kb_id}/documents/{document_id}", response_model=sch.DocumentRead,
            summary="A document and its ingestion progress")
async def get_document(kb_id: uuid.UUID, document_id: uuid.UUID, p: Reader, s: SessionDep,
                       request: Request) -> Any:
    kb = await svc(request).get_kb(s, p, kb_id)
    return await svc(request).get_document(s, p, kb, document_id)


@router.get("/{kb_id}/documents/{document_id}/chunks", response_model=list[sch.ChunkRead],
            summary="The searchable chunks of a document, in order")
async def document_chunks(kb_id: uuid.UUID, document_id: uuid.UUID, p: Reader, s: SessionDep,
                          request: Request, offset: Annotated[int, Query(ge=0)] = 0,
                          limit: Annotated[int, Query(ge=1, le=500)] = 100) -> Any:
    kb = await svc(request).get_kb(s, p, kb_id)
    d = await svc(request).get_document(s, p, kb, document_id)
    rows = (await s.execute(select(Chunk).where(
        Chunk.document_id == d.id, Chunk.org_id == p.org_id,
        Chunk.generation == d.live_generation).order_by(Chunk.idx).offset(offset).limit(
        limit))).scalars()
    return list(rows)


@router.post("/{kb_id}/documents/{document_id}/reindex", status_code=202,
             response_model=sch.DocumentRead,
             summary="Ingest a document again (new chunking settings, or after a failure)")
async def reindex(kb_id: uuid.UUID, document_id: uuid.UUID, p: Writer, s: SessionDep,
                  request: Request) -> Any:
    kb = await svc(request).get_kb(s, p, kb_id, write=True)
    d = await svc(request).reindex(s, p, kb, document_id)
    _wake(request)
    return d


@router.delete("/{kb_id}/documents/{document_id}", status_code=204,
               summary="Remove a document with its chunks and vectors")
async def delete_document(kb_id: uuid.UUID, document_id: uuid.UUID, p: Deleter, s: SessionDep,
                          request: Request) -> Response:
    kb = await svc(request).get_kb(s, p, kb_id, write=True)
    await svc(request).delete_document(s, p, kb, document_id)
    return Response(status_code=204)


# ---- retrieval and answers ---------------------------------------------------------------------

@router.post("/{kb_id}/retrieve", response_model=sch.RetrieveResponse,
             summary="Search a knowledge base (vector, keyword BM25, or hybrid)")
async def retrieve(kb_id: uuid.UUID, body: sch.RetrieveRequest, p: Reader,
                   request: Request) -> Any:
    # No transaction: retrieval reads committed rows only (KbService.retrieve).
    started = time.perf_counter()
    kb = await svc(request).get_kb_for_query(p, kb_id)
    hits = await svc(request).retrieve(p, kb, query=body.query, top_k=body.top_k,
                                       mode=body.mode, score_threshold=body.score_threshold,
                                       filters=body.filters, vector_weight=body.vector_weight)
    # Written directly (the hits are plain dataclasses of the response model's fields):
    # validating them again against the model would only repeat the work.
    return Response(orjson.dumps({"mode": body.mode, "hits": hits, "took_ms": round(
        (time.perf_counter() - started) * 1000, 2)}), media_type="application/json")


@router.post("/{kb_id}/chat", response_model=sch.ChatResponse,
             summary="Answer from the knowledge base with numbered citations (SSE with stream)",
             responses={200: {"content": {"text/event-stream": {}}, "description": (
                 "With stream: `sources`, then `delta` events with the answer's text, then "
                 "`done` with the answer and its citations")}})
async def chat(kb_id: uuid.UUID, body: sch.ChatRequest, p: Reader, request: Request) -> Any:
    service = svc(request)
    rag: Rag = request.app.state.kb_rag
    # No transaction is held while the question is rewritten and the sources retrieved (both
    # wait on models): the knowledge base and its chunks are read as committed rows.
    kb = await service.get_kb_for_query(p, kb_id)
    model = body.model or kb.chat_model
    if not model:
        raise ValidationFailed("name a chat model (this knowledge base has no chat_model)",
                               extra={"field": "model"})
    messages = [m.model_dump() for m in body.messages]
    prepared = await rag.prepare(p, kb, messages=messages, model=model,
                                 top_k=body.top_k, min_score=body.min_score,
                                 filters=body.filters, context_tokens=body.context_tokens)
    sources = [src.view() for src in prepared.sources]
    if not body.stream:
        text = await rag.answer(p, prepared, model, body.max_tokens, body.temperature)
        answer, citations = cite(text, prepared.sources)
        return {"answer": answer, "citations": citations, "sources": sources,
                "question": prepared.question, "rewritten_question": prepared.rewritten,
                "known": prepared.known, "model": model}

    async def events() -> AsyncIterator[bytes]:
        yield _sse("sources", {"sources": sources, "question": prepared.question,
                               "rewritten_question": prepared.rewritten,
                               "known": prepared.known})
        parts: list[str] = []
        try:
            if not prepared.known:
                parts.append(await rag.answer(p, prepared, model, body.max_tokens,
                                              body.temperature))
                yield _sse("delta", {"text": parts[-1]})
            else:
                async for piece in rag.stream(p, prepared, model, body.max_tokens,
                                              body.temperature):
                    parts.append(piece)
                    yield _sse("delta", {"text": piece})
        except WorkbenchError as exc:
            yield _sse("error", {"code": exc.code, "detail": str(exc)})
            return
        answer, citations = cite("".join(parts).strip(), prepared.sources)
        yield _sse("done", {"answer": answer, "citations": citations, "known": prepared.known,
                            "model": model})

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
