"""The kb domain: knowledge bases with their access lists, documents (uploaded or imported from a
dataset version, stored in the object store, queued for ingestion) and the retrieval that
answers queries — vector search in Milvus, BM25 over the keyword index, or both fused by rank.
Functions take a session and a principal; they flush, never commit."""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.kb import bm25
from services.kb.events import Events
from services.kb.models import Chunk, Document, KnowledgeBase, Posting
from services.kb.settings import KbSettings
from services.kb.upstream import Upstream
from services.kb.vectors import MAX_TOP_K, VectorStore, metadata_filter_expr
from workbench.cache import TtlCache
from workbench.db import Database, utcnow
from workbench.errors import Conflict, Forbidden, NotFound, ValidationFailed, WorkbenchError
from workbench.identity.principal import Principal, Role
from workbench.repository import Repository
from workbench.storage import ObjectStore

log = logging.getLogger("services.kb")
UPDATE_EVERY = {"daily": timedelta(days=1), "weekly": timedelta(days=7)}
_ACL_ENTRY = re.compile(r"^(role:(owner|admin|member|viewer)|user:[0-9a-fA-F-]{36})$")
# Fields of a document every filter may use besides its own metadata.
BUILTIN_FILTERS = ("document_id", "format")


class KbRepo(Repository[KnowledgeBase]):
    model = KnowledgeBase
    noun = "knowledge base"


class DocRepo(Repository[Document]):
    model = Document
    noun = "document"


@dataclass
class Hit:
    chunk_id: str
    document_id: str
    document_name: str
    chunk_index: int
    text: str
    heading: str
    page: int | None
    score: float
    vector_score: float | None = None
    keyword_score: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def chunk_uuid(document_id: uuid.UUID, generation: int, index: int) -> uuid.UUID:
    """Stable per (document, generation, position): a resumed ingestion rewrites, never adds."""
    digest = hashlib.sha256(f"{document_id}:{generation}:{index}".encode()).digest()
    return uuid.UUID(bytes=digest[:16], version=4)


def check_access_list(access: Mapping[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, entries in access.items():
        if key not in ("read", "write"):
            raise ValidationFailed(f"access has 'read' and 'write' lists, not {key!r}",
                                   extra={"field": "access"})
        if not isinstance(entries, list) or len(entries) > 500:
            raise ValidationFailed(f"access.{key} is a list of at most 500 entries",
                                   extra={"field": f"access.{key}"})
        for e in entries:
            if not isinstance(e, str) or not _ACL_ENTRY.match(e):
                raise ValidationFailed(
                    f"access.{key}: {str(e)[:60]!r} is not 'role:<owner|admin|member|viewer>' "
                    "or 'user:<user id>'", extra={"field": f"access.{key}"})
        out[key] = sorted(set(entries))
    return out


def _listed(entries: Sequence[str], p: Principal) -> bool:
    return f"role:{p.role.value}" in entries or f"user:{p.user_id}" in entries


def can_read(kb: KnowledgeBase, p: Principal) -> bool:
    """Owners and admins reach every knowledge base; others, when the access list names
    anyone, only if it names them or their role (writers may read)."""
    if p.role in (Role.OWNER, Role.ADMIN):
        return True
    acl = kb.access or {}
    readers = list(acl.get("read") or []) + list(acl.get("write") or [])
    return not readers or _listed(readers, p)


def can_write(kb: KnowledgeBase, p: Principal) -> bool:
    if p.role in (Role.OWNER, Role.ADMIN):
        return True
    writers = list((kb.access or {}).get("write") or [])
    return can_read(kb, p) if not writers else _listed(writers, p)


def document_matches(row: Any, filters: Mapping[str, Any]) -> bool:
    """`row`: a row of `_LIVE_COLUMNS` (document_id, format, meta)."""
    for key, want in filters.items():
        have = (str(row.document_id) if key == "document_id" else row.format
                if key == "format" else (row.meta or {}).get(key))
        wanted = want if isinstance(want, list) else [want]
        if have not in wanted:
            return False
    return True


# What a hit shows of a chunk and its document (and what filters look at).
_LIVE_COLUMNS = (Chunk.id, Chunk.idx, Chunk.text, Chunk.heading, Chunk.page,
                 Document.id.label("document_id"), Document.name, Document.format,
                 Document.meta.label("meta"))
# The rows of the searchable chunks among some ids (indexed, of their document's live
# generation, of one org's knowledge base): built once, as it runs for every vector search.
_LIVE_CHUNKS = select(*_LIVE_COLUMNS).join(Document, Document.id == Chunk.document_id).where(
    Chunk.id.in_(bindparam("ids", expanding=True)), Chunk.kb_id == bindparam("kb_id"),
    Chunk.org_id == bindparam("org_id"), Chunk.indexed.is_(True),
    Chunk.generation == Document.live_generation)
_KB_COLUMNS = tuple(a.key for a in inspect(KnowledgeBase).column_attrs)
# One org's knowledge base by id, as plain values of `_KB_COLUMNS`.
_KB_ROW = select(*(getattr(KnowledgeBase, k) for k in _KB_COLUMNS)).where(
    KnowledgeBase.org_id == bindparam("org_id"), KnowledgeBase.id == bindparam("kb_id"))


def _checked(kb: KnowledgeBase, p: Principal, *, write: bool) -> KnowledgeBase:
    """404 for a knowledge base the caller may not read; 403 for a write by someone who may
    only read it."""
    if not can_read(kb, p):
        raise NotFound(f"knowledge base {kb.id} does not exist")
    if write and not can_write(kb, p):
        raise Forbidden("this knowledge base's access list lets you read it, not change it",
                        code="kb_read_only")
    return kb


class KbService:
    def __init__(self, settings: KbSettings, db: Database, store: ObjectStore,
                 vectors: VectorStore, upstream: Upstream, events: Events) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.vectors = vectors
        self.upstream = upstream
        self.events = events
        # (org, knowledge base) -> snapshot: the query paths' lookups.
        self._kb_cache: TtlCache[tuple[uuid.UUID, uuid.UUID], KnowledgeBase] = TtlCache(
            settings.kb_lookup_cache_s)

    # ---- knowledge bases ---------------------------------------------------------------------

    async def create_kb(self, s: AsyncSession, p: Principal, *, project_id: uuid.UUID,
                        name: str, description: str, embedding_model: str,
                        chat_model: str | None, chunk_strategy: str, chunk_size: int,
                        chunk_overlap: int, update_strategy: str,
                        access: Mapping[str, Any]) -> KnowledgeBase:
        await self.upstream.check_project(p.org_id, project_id)
        taken = (await s.execute(KbRepo(s, p.org_id).scoped().where(
            KnowledgeBase.project_id == project_id, KnowledgeBase.name == name))).first()
        if taken is not None:
            raise Conflict(f"the project already has a knowledge base named {name!r}",
                           code="name_taken", extra={"field": "name"})
        # One real embedding tells that the model exists, is an embedding model the org may
        # call, and how many dimensions its vectors have.
        try:
            probe = await self.upstream.embed(p.org_id, p.user_id, embedding_model,
                                              ["dimension"])
        except WorkbenchError as exc:
            if exc.status >= 500:
                raise
            raise ValidationFailed(f"embedding_model {embedding_model!r} cannot embed: {exc}",
                                   code="invalid_embedding_model",
                                   extra={"field": "embedding_model"}) from exc
        kb = KnowledgeBase(
            org_id=p.org_id, project_id=project_id, name=name, description=description,
            embedding_model=embedding_model, embedding_dim=len(probe[0]),
            chat_model=chat_model, chunk_strategy=chunk_strategy, chunk_size=chunk_size,
            chunk_overlap=chunk_overlap, update_strategy=update_strategy,
            access=check_access_list(access), created_by=p.actor,
            next_refresh_at=(utcnow() + UPDATE_EVERY[update_strategy]
                             if update_strategy in UPDATE_EVERY else None))
        await KbRepo(s, p.org_id).add(kb)
        await self.vectors.ensure_collection(kb.id, kb.embedding_dim)
        await self.events.kb_created(s, kb, p.actor)
        return kb

    async def get_kb(self, s: AsyncSession, p: Principal, kb_id: uuid.UUID, *,
                     write: bool = False) -> KnowledgeBase:
        """404 for another org's knowledge base and for one the caller may not read; 403 for a
        write by someone who may only read it."""
        return _checked(await KbRepo(s, p.org_id).get(kb_id), p, write=write)

    async def get_kb_for_query(self, p: Principal, kb_id: uuid.UUID) -> KnowledgeBase:
        """`get_kb` for retrieval and answers, which read a knowledge base's settings and change
        nothing: its committed row is read outside any transaction (`Database.read`) and kept
        for `kb_lookup_cache_s` (as a snapshot, never written back). The access check runs on
        every call; a change through this replica applies at once (updates and deletes forget
        the entry, again when they commit), one through another replica within that time."""
        key = (p.org_id, kb_id)
        kb = self._kb_cache.get(key)
        if kb is None:
            rows = await self.db.read(_KB_ROW, {"org_id": p.org_id, "kb_id": kb_id})
            if not rows:
                raise NotFound(f"knowledge base {kb_id} does not exist")
            kb = KnowledgeBase(**dict(zip(_KB_COLUMNS, rows[0], strict=True)))
            self._kb_cache.put(key, kb)
        return _checked(kb, p, write=False)

    def _forget(self, s: AsyncSession, kb: KnowledgeBase) -> None:
        key = (kb.org_id, kb.id)
        self._kb_cache.forget(s, lambda k: k == key)

    async def list_kbs(self, s: AsyncSession, p: Principal, *, project_id: uuid.UUID | None,
                       limit: int, cursor: str | None) -> tuple[list[KnowledgeBase], str | None]:
        where = [KnowledgeBase.project_id == project_id] if project_id else []
        rows, nxt = await KbRepo(s, p.org_id).list(limit=limit, cursor=cursor, where=where)
        return [kb for kb in rows if can_read(kb, p)], nxt

    async def update_kb(self, s: AsyncSession, p: Principal, kb_id: uuid.UUID,
                        changes: dict[str, Any]) -> KnowledgeBase:
        kb = await self.get_kb(s, p, kb_id, write=True)
        if "access" in changes:
            changes["access"] = check_access_list(changes["access"])
            if p.role not in (Role.OWNER, Role.ADMIN) and not _listed(
                    changes["access"].get("write") or changes["access"].get("read") or
                    [f"role:{p.role.value}"], p):
                raise ValidationFailed("this access list would lock you out of the knowledge "
                                       "base; an admin can change it for you",
                                       extra={"field": "access"})
        size = changes.get("chunk_size", kb.chunk_size)
        overlap = changes.get("chunk_overlap", kb.chunk_overlap)
        if overlap * 2 > size:
            raise ValidationFailed("chunk_overlap may be at most half of chunk_size",
                                   extra={"field": "chunk_overlap"})
        if "name" in changes and changes["name"] != kb.name:
            taken = (await s.execute(KbRepo(s, p.org_id).scoped().where(
                KnowledgeBase.project_id == kb.project_id,
                KnowledgeBase.name == changes["name"]))).first()
            if taken is not None:
                raise Conflict(f"the project already has a knowledge base named "
                               f"{changes['name']!r}", code="name_taken",
                               extra={"field": "name"})
        changed = [k for k, v in changes.items() if getattr(kb, k) != v]
        for k in changed:
            setattr(kb, k, changes[k])
        if "update_strategy" in changed:
            kb.next_refresh_at = (utcnow() + UPDATE_EVERY[kb.update_strategy]
                                  if kb.update_strategy in UPDATE_EVERY else None)
        if changed:
            await s.flush()
            self._forget(s, kb)
            await self.events.kb_updated(s, kb, changed, p.actor)
        return kb

    async def delete_kb(self, s: AsyncSession, p: Principal, kb_id: uuid.UUID) -> None:
        kb = await self.get_kb(s, p, kb_id, write=True)
        docs = list((await s.execute(select(Document).where(Document.kb_id == kb.id))).scalars())
        chunks = int((await s.execute(select(func.count()).select_from(Chunk).where(
            Chunk.kb_id == kb.id))).scalar_one())
        await self.vectors.drop(kb.id, kb.org_id)
        await s.execute(delete(Posting).where(Posting.kb_id == kb.id))
        await s.execute(delete(Chunk).where(Chunk.kb_id == kb.id))
        await s.execute(delete(Document).where(Document.kb_id == kb.id))
        await self.events.kb_deleted(s, kb, len(docs), chunks, p.actor)
        self._forget(s, kb)
        await s.delete(kb)
        await s.flush()
        for d in docs:
            await self._delete_objects(d)

    # ---- documents ---------------------------------------------------------------------------

    def staging_key(self, org_id: uuid.UUID, kb_id: uuid.UUID) -> str:
        """Where an incoming file is stored; the document keeps this key (one per content)."""
        return f"kb/{org_id}/{kb_id}/{uuid.uuid4().hex}"

    async def add_document(self, s: AsyncSession, p: Principal, kb: KnowledgeBase, *,
                           name: str, object_key: str, size: int, sha256: str,
                           content_type: str, fmt: str, meta: dict[str, Any] | None,
                           source: dict[str, Any]) -> tuple[Document, bool]:
        """Takes a file already in the object store (at `object_key`) as the document `name` of
        the knowledge base: a new document, or the next generation of one whose content
        changed (its previous chunks keep answering until the new ones are indexed). Returns
        (document, queued); an unchanged re-upload queues nothing."""
        d = (await s.execute(DocRepo(s, p.org_id).scoped().where(
            Document.kb_id == kb.id, Document.name == name))).scalar_one_or_none()
        if d is not None and d.sha256 == sha256 and d.status in ("queued", "processing",
                                                                 "indexed"):
            await self.store.delete(object_key)
            return d, False
        reason = str(source.get("type", "upload"))
        old_key = None
        if d is None:
            d = Document(org_id=p.org_id, kb_id=kb.id, name=name, sha256=sha256,
                         object_key=object_key, created_by=p.actor, generation=1)
            await DocRepo(s, p.org_id).add(d)
        else:
            old_key = d.object_key
            d.generation += 1
            reason = "refresh" if reason == "refresh" else "replaced"
        d.object_key = object_key
        d.size_bytes, d.sha256, d.content_type, d.format = size, sha256, content_type, fmt
        if meta is not None:
            d.meta = meta
        d.source = source
        d.status, d.error, d.error_code = "queued", "", ""
        d.chunks_total = d.chunks_done = d.attempts = 0
        d.lease_owner = d.lease_until = None
        await s.flush()
        await self.events.document_queued(s, d, reason, p.actor)
        if old_key and old_key != object_key:
            await self.store.delete(old_key)
        return d, True

    async def get_document(self, s: AsyncSession, p: Principal, kb: KnowledgeBase,
                           document_id: uuid.UUID) -> Document:
        d = await DocRepo(s, p.org_id).get(document_id)
        if d.kb_id != kb.id:
            raise NotFound(f"document {document_id} does not exist")
        return d

    async def list_documents(self, s: AsyncSession, p: Principal, kb: KnowledgeBase, *,
                             status: str | None, limit: int, cursor: str | None
                             ) -> tuple[list[Document], str | None]:
        where: list[Any] = [Document.kb_id == kb.id]
        if status:
            where.append(Document.status == status)
        return await DocRepo(s, p.org_id).list(limit=limit, cursor=cursor, where=where)

    async def progress(self, s: AsyncSession, kb: KnowledgeBase) -> dict[str, Any]:
        rows = (await s.execute(select(Document.status, func.count(), func.sum(
            Document.chunks_done), func.sum(Document.chunks_total)).where(
            Document.kb_id == kb.id).group_by(Document.status))).all()
        by_status = {r[0]: int(r[1]) for r in rows}
        total = sum(by_status.values())
        done = by_status.get("indexed", 0)
        return {"documents_total": total, "documents_done": done,
                "documents_failed": by_status.get("failed", 0),
                "documents_pending": by_status.get("queued", 0) + by_status.get(
                    "processing", 0),
                "chunks_done": int(sum(r[2] or 0 for r in rows)),
                "chunks_total": int(sum(r[3] or 0 for r in rows)),
                "by_status": by_status}

    async def delete_document(self, s: AsyncSession, p: Principal, kb: KnowledgeBase,
                              document_id: uuid.UUID) -> None:
        d = await self.get_document(s, p, kb, document_id)
        chunks = int((await s.execute(select(func.count()).select_from(Chunk).where(
            Chunk.document_id == d.id, Chunk.generation == d.live_generation))).scalar_one())
        await self.vectors.delete_document(kb.id, kb.org_id, d.id)
        await s.execute(delete(Posting).where(Posting.chunk_id.in_(
            select(Chunk.id).where(Chunk.document_id == d.id))))
        await s.execute(delete(Chunk).where(Chunk.document_id == d.id))
        await self.events.document_deleted(s, d, chunks, p.actor)
        await s.delete(d)
        await s.flush()
        await self.recount(s, kb)
        await self._delete_objects(d)

    async def reindex(self, s: AsyncSession, p: Principal, kb: KnowledgeBase,
                      document_id: uuid.UUID) -> Document:
        """Ingest the document again (after a change of chunking settings, or a failure)."""
        d = await self.get_document(s, p, kb, document_id)
        if d.status in ("queued", "processing"):
            raise Conflict("the document is being ingested already", code="ingesting")
        d.generation += 1
        d.status, d.error, d.error_code = "queued", "", ""
        d.chunks_total = d.chunks_done = d.attempts = 0
        await s.flush()
        await self.events.document_queued(s, d, "reindex", p.actor)
        return d

    async def _delete_objects(self, d: Document) -> None:
        try:
            await self.store.delete(d.object_key)
        except Exception as exc:  # the rows are gone; a stray file is logged, not fatal
            log.warning("could not delete %s: %s", d.object_key, exc)

    async def recount(self, s: AsyncSession, kb: KnowledgeBase) -> None:
        kb.document_count = int((await s.execute(select(func.count()).select_from(
            Document).where(Document.kb_id == kb.id))).scalar_one())
        kb.chunk_count = int((await s.execute(
            select(func.count()).select_from(Chunk).join(
                Document, Document.id == Chunk.document_id).where(
                Chunk.kb_id == kb.id, Chunk.generation == Document.live_generation,
                Chunk.indexed.is_(True)))).scalar_one())
        await s.flush()

    # ---- retrieval ---------------------------------------------------------------------------

    async def retrieve(self, p: Principal, kb: KnowledgeBase, *, query: str,
                       top_k: int, mode: str, score_threshold: float | None,
                       filters: Mapping[str, Any] | None,
                       vector_weight: float = 0.75) -> list[Hit]:
        """`vector_weight` (0..1): the vector side's share of the fusion in hybrid mode, the
        keyword side has the rest. Reads committed rows outside any transaction
        (`Database.read`): a query neither waits for the ingestion's writes nor holds a lock."""
        filters = dict(filters or {})
        meta_filters = {k: v for k, v in filters.items() if k not in BUILTIN_FILTERS}
        metadata_filter_expr(meta_filters)  # validates keys and values (422 on a bad one)
        for key in BUILTIN_FILTERS:
            if key in filters:
                v = filters[key]
                if not all(isinstance(x, str) for x in (v if isinstance(v, list) else [v])):
                    raise ValidationFailed(f"filter {key!r} takes a string or a list of them",
                                           extra={"field": f"filters.{key}"})
        if not 1 <= top_k <= 100:
            raise ValidationFailed("top_k must be 1..100", extra={"field": "top_k"})
        want = min(MAX_TOP_K, top_k * 4 + 10)
        vector_hits: list[Hit] = []
        keyword_hits: list[Hit] = []
        if mode in ("vector", "hybrid"):
            # Vector mode reads a few more ids than it returns (some may be gone); hybrid
            # fuses the longer lists of both sides.
            vector_hits = await self._vector_search(
                p, kb, query, min(MAX_TOP_K, top_k * 2) if mode == "vector" else want,
                filters, meta_filters, need=top_k if mode == "vector" else want)
            if score_threshold is not None:
                vector_hits = [h for h in vector_hits if h.score >= score_threshold]
        if mode in ("keyword", "hybrid"):
            keyword_hits = await self._keyword_search(kb, query, want, filters)
            if score_threshold is not None and mode == "keyword":
                keyword_hits = [h for h in keyword_hits if h.score >= score_threshold]
        if mode == "vector":
            return vector_hits[:top_k]
        if mode == "keyword":
            return keyword_hits[:top_k]
        by_id = {h.chunk_id: h for h in keyword_hits}
        for h in vector_hits:
            kh = by_id.get(h.chunk_id)
            h.vector_score = h.score
            h.keyword_score = kh.score if kh else None
            by_id[h.chunk_id] = h
        for h in keyword_hits:
            if h.vector_score is None and by_id[h.chunk_id] is h:
                h.keyword_score = h.score
        fused = bm25.rrf_fuse([[h.chunk_id for h in vector_hits],
                               [h.chunk_id for h in keyword_hits]],
                              weights=[vector_weight, 1.0 - vector_weight])
        out = []
        for chunk_id, score in fused[:top_k]:
            h = by_id[chunk_id]
            h.score = score
            out.append(h)
        return out

    async def _live_chunks(self, kb: KnowledgeBase, ids: Sequence[uuid.UUID]
                           ) -> dict[uuid.UUID, Any]:
        """The rows (`_LIVE_COLUMNS`) of those chunks that are searchable: indexed, of their
        document's live generation, of this org's knowledge base."""
        if not ids:
            return {}
        rows = await self.db.read(_LIVE_CHUNKS, {"ids": list(ids), "kb_id": kb.id,
                                                 "org_id": kb.org_id})
        return {r.id: r for r in rows}

    async def _vector_search(self, p: Principal, kb: KnowledgeBase,
                             query: str, limit: int, filters: Mapping[str, Any],
                             meta_filters: Mapping[str, Any], need: int) -> list[Hit]:
        """At least `need` live hits when there are, best first: Milvus is asked for `limit`
        ids (a search's cost grows with it), their chunks read from SQL; when replaced or
        deleted documents (whose vectors are still being removed) leave fewer than `need`,
        the search is repeated with a larger limit."""
        [vector] = await self.upstream.embed(kb.org_id, p.user_id, kb.embedding_model, [query])
        doc_ids = filters.get("document_id")
        while True:
            hits = await self.vectors.search(
                kb.id, kb.org_id, vector, limit, filters=meta_filters or None,
                document_ids=([doc_ids] if isinstance(doc_ids, str) else doc_ids)
                if doc_ids is not None else None, with_text=False)
            live = await self._live_chunks(kb, [uuid.UUID(h.chunk_id) for h in hits])
            out = []
            for h in hits:
                found = live.get(uuid.UUID(h.chunk_id))
                if found is not None and document_matches(found, filters):
                    out.append(self._hit(found, h.score))
            if len(out) >= need or len(hits) < limit or limit >= MAX_TOP_K:
                return out
            limit = min(MAX_TOP_K, limit * 4)

    async def _keyword_search(self, kb: KnowledgeBase, query: str, want: int,
                              filters: Mapping[str, Any]) -> list[Hit]:
        terms = sorted(set(bm25.analyze(query)))[:64]
        if not terms:
            return []
        rows = await self.db.read(select(Posting.term, Posting.chunk_id, Posting.tf).join(
            Chunk, Chunk.id == Posting.chunk_id).join(
            Document, Document.id == Chunk.document_id).where(
            Posting.kb_id == kb.id, Posting.term.in_(terms),
            Chunk.generation == Document.live_generation, Chunk.indexed.is_(True)))
        if not rows:
            return []
        postings: dict[str, list[tuple[uuid.UUID, int]]] = defaultdict(list)
        for term, chunk_id, tf in rows:
            postings[term].append((chunk_id, tf))
        [(n, total)] = await self.db.read(select(func.count(), func.sum(Chunk.length)).join(
            Document, Document.id == Chunk.document_id).where(
            Chunk.kb_id == kb.id, Chunk.indexed.is_(True),
            Chunk.generation == Document.live_generation))
        candidate_ids = {c for plist in postings.values() for c, _ in plist}
        lengths = {r.id: r.length for r in await self.db.read(
            select(Chunk.id, Chunk.length).where(Chunk.id.in_(list(candidate_ids))))}
        scores = bm25.bm25_scores(terms, postings, lengths, int(n or 0),
                                  float(total or 0) / max(1, int(n or 1)))
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], str(kv[0])))
        live = await self._live_chunks(kb, [c for c, _ in ranked[:want * 3]])
        out = []
        for chunk_id, score in ranked:
            found = live.get(chunk_id)
            if found is None or not document_matches(found, filters):
                continue
            out.append(self._hit(found, score))
            if len(out) >= want:
                break
        return out

    @staticmethod
    def _hit(r: Any, score: float) -> Hit:
        return Hit(chunk_id=str(r.id), document_id=str(r.document_id), document_name=r.name,
                   chunk_index=r.idx, text=r.text, heading=r.heading, page=r.page,
                   score=float(score), metadata=dict(r.meta or {}))

    # ---- scheduled refresh -------------------------------------------------------------------

    async def due_refreshes(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        async with self.db.transaction() as s:
            rows = (await s.execute(select(KnowledgeBase.org_id, KnowledgeBase.id).where(
                KnowledgeBase.next_refresh_at.is_not(None),
                KnowledgeBase.next_refresh_at <= utcnow()))).all()
        return [(r[0], r[1]) for r in rows]

    async def mark_refreshed(self, s: AsyncSession, kb: KnowledgeBase,
                             now: datetime) -> None:
        kb.last_refresh_at = now
        kb.next_refresh_at = (now + UPDATE_EVERY[kb.update_strategy]
                              if kb.update_strategy in UPDATE_EVERY else None)
        await s.flush()

    async def stale_chunks(self, s: AsyncSession, d: Document) -> list[uuid.UUID]:
        return list((await s.execute(select(Chunk.id).where(
            Chunk.document_id == d.id, Chunk.generation != d.generation))).scalars())

    async def drop_chunks(self, s: AsyncSession, ids: Sequence[uuid.UUID]) -> None:
        for start in range(0, len(ids), 500):
            part = list(ids[start:start + 500])
            await s.execute(delete(Posting).where(Posting.chunk_id.in_(part)))
            await s.execute(delete(Chunk).where(Chunk.id.in_(part)))


