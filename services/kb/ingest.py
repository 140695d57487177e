"""Ingestion: a loop in every replica of the kb service takes queued documents (a lease in the
document's row says who works on it and until when; it is renewed after every batch, so a
replica that dies leaves documents another one picks up once their lease runs out), parses and
chunks them, embeds the chunks in batches through the inference service, writes the vectors to
Milvus and the terms to the keyword index, and records progress after each batch.

Resuming is exact: chunk ids are derived from (document, generation, position), chunks are
written before they are embedded and flagged once their vector and terms are stored, so a
restarted ingestion skips what was done and rewrites (never duplicates) a batch that was in
flight. When every chunk of the new generation is indexed it goes live in one transaction and
the previous generation's chunks and vectors are removed."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from datetime import timedelta
from typing import Any

import anyio.to_thread
from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from services.kb import bm25, chunking, parsing
from services.kb.models import Chunk, Document, KnowledgeBase, Posting
from services.kb.service import KbService, chunk_uuid
from services.kb.vectors import ChunkVector
from workbench.db import utcnow
from workbench.errors import WorkbenchError
from workbench.polling import IdleInterval

log = logging.getLogger("services.kb.ingest")
# Documents whose errors retrying cannot fix (the file itself is bad).
PERMANENT = (parsing.DocumentError, ValueError)


class LeaseLost(Exception):
    """Another replica took the document over (this one was too slow to renew its lease)."""


class Ingestor:
    def __init__(self, service: KbService) -> None:
        self.service = service
        self.settings = service.settings
        self.db = service.db
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # Knowledge bases written to since the last flush of their vectors.
        self._unflushed: set[uuid.UUID] = set()
        self._counter: Any = None
        self._retry_until = 0.0  # monotonic time the last retry this replica set falls due

    def count_tokens(self, text: str) -> int:
        if self._counter is None:
            try:  # the built-in embedding model's tokenizer: chunk sizes in its tokens
                self._counter = chunking.tokenizer_counter()
            except (FileNotFoundError, ImportError):
                self._counter = chunking.approximate_token_count
        return int(self._counter(text))

    # ---- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Claims documents while it has room: at once when an upload (or a finished document)
        wakes it, else every `kb_poll_interval_s` — stretching while there is nothing to do —
        for documents no wake-up announced (another replica's expired lease)."""
        idle = IdleInterval(self.settings.kb_poll_interval_s)
        while True:
            # A retry this replica scheduled keeps the poll at its interval until it is due.
            busy = bool(self._tasks) or time.monotonic() <= self._retry_until
            try:
                while len(self._tasks) < self.settings.kb_ingest_concurrency:
                    doc_id = await self.claim()
                    if doc_id is None:
                        break
                    busy = True
                    task = asyncio.create_task(self.process(doc_id), name=f"ingest-{doc_id}")
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
                if not self._tasks and self._unflushed:
                    await self._flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                busy = True  # retried at the base interval
                log.warning("ingestion loop: %s", exc)
            idle.found(busy)
            await idle.wait(self.wake.wait())
            self.wake.clear()

    async def _flush(self) -> None:
        """Nothing left to ingest: seal the new vectors so searches use the index."""
        while self._unflushed:
            kb_id = self._unflushed.pop()
            try:
                await self.service.vectors.flush(kb_id)
            except Exception as exc:
                log.warning("flushing the vectors of knowledge base %s: %s", kb_id, exc)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.wake.set()

    async def stop(self) -> None:
        """Cancel work in hand; leases are given back so another replica resumes at once."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with self.db.transaction() as s:
            await s.execute(update(Document).where(Document.lease_owner == self.owner).values(
                lease_owner=None, lease_until=None, status="queued"))

    async def claim(self) -> uuid.UUID | None:
        """The oldest queued document, or one whose lease ran out; None when there is none."""
        now = utcnow()
        async with self.db.transaction() as s:
            # A queued document's lease_until, when set, is when its retry is due.
            claimable = or_(
                (Document.status == "queued") & or_(Document.lease_until.is_(None),
                                                   Document.lease_until < now),
                (Document.status == "processing") & (Document.lease_until < now))
            candidates = list((await s.execute(select(Document.id).where(claimable).order_by(
                Document.updated_at).limit(8))).scalars())
            for doc_id in candidates:
                res = await s.execute(update(Document).where(
                    Document.id == doc_id, claimable).values(
                    status="processing", lease_owner=self.owner,
                    lease_until=now + timedelta(seconds=self.settings.kb_lease_s),
                    attempts=Document.attempts + 1))
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    return doc_id
        return None

    async def _renew(self, s: Any, d: Document) -> None:
        res = await s.execute(update(Document).where(
            Document.id == d.id, Document.lease_owner == self.owner,
            Document.generation == d.generation).values(
            lease_until=utcnow() + timedelta(seconds=self.settings.kb_lease_s)))
        if res.rowcount != 1:
            raise LeaseLost(str(d.id))

    # ---- one document ------------------------------------------------------------------------

    async def process(self, doc_id: uuid.UUID) -> None:
        started = time.monotonic()
        try:
            async with self.db.transaction() as s:
                d = await s.get(Document, doc_id)
                if d is None or d.lease_owner != self.owner:
                    return
                kb = await s.get(KnowledgeBase, d.kb_id)
                if kb is None:
                    return
                s.expunge(d)
                s.expunge(kb)
            await self._chunk(d, kb)
            await self._embed(d, kb)
            await self._go_live(d, kb, time.monotonic() - started)
        except asyncio.CancelledError:
            raise
        except LeaseLost:
            log.info("document %s was taken over by another replica", doc_id)
        except PERMANENT as exc:
            await self._fail(doc_id, getattr(exc, "code", "invalid_document"), str(exc),
                             permanent=True)
        except Exception as exc:
            log.warning("ingesting document %s failed: %s", doc_id, exc)
            code = exc.code if isinstance(exc, WorkbenchError) else "ingestion_failed"
            await self._fail(doc_id, code, str(exc) or type(exc).__name__, permanent=False)

    async def _read(self, d: Document) -> bytes:
        parts = []
        size = 0
        async for part in self.service.store.get_stream(d.object_key):
            size += len(part)
            if size > self.settings.kb_max_document_bytes:
                raise parsing.DocumentError("the document is larger than the limit")
            parts.append(part)
        return b"".join(parts)

    async def _chunk(self, d: Document, kb: KnowledgeBase) -> None:
        """Writes the generation's chunks once (a resumed run finds them there)."""
        async with self.db.transaction() as s:
            have = int((await s.execute(select(func.count()).select_from(Chunk).where(
                Chunk.document_id == d.id, Chunk.generation == d.generation))).scalar_one())
        if have:
            d.chunks_total = have
            return
        data = await self._read(d)

        def work() -> list[Any]:
            doc = parsing.parse(d.name, data, d.content_type)
            return chunking.chunk(doc, strategy=kb.chunk_strategy, chunk_size=kb.chunk_size,
                                  chunk_overlap=kb.chunk_overlap,
                                  count_tokens=self.count_tokens)

        pieces = await anyio.to_thread.run_sync(work)
        if not pieces:
            raise parsing.EmptyDocument(f"{d.name!r} contains no text")
        rows = [{"id": chunk_uuid(d.id, d.generation, c.index), "org_id": d.org_id,
                 "kb_id": d.kb_id, "document_id": d.id, "generation": d.generation,
                 "idx": c.index, "text": c.text, "heading": " / ".join(c.heading_path),
                 "page": c.page, "token_count": c.token_count,
                 "length": len(bm25.analyze(c.text)), "indexed": False} for c in pieces]
        async with self.db.transaction() as s:
            await self._renew(s, d)
            insert = pg_insert if not self.db.is_sqlite else sqlite_insert
            for start in range(0, len(rows), 500):
                await s.execute(insert(Chunk).values(rows[start:start + 500])
                                .on_conflict_do_nothing())
            await s.execute(update(Document).where(Document.id == d.id).values(
                chunks_total=len(rows), chunks_done=0))
            d.chunks_total = len(rows)

    async def _embed(self, d: Document, kb: KnowledgeBase) -> None:
        batch_size = self.settings.kb_embed_batch
        while True:
            async with self.db.transaction() as s:
                batch = list((await s.execute(select(Chunk).where(
                    Chunk.document_id == d.id, Chunk.generation == d.generation,
                    Chunk.indexed.is_(False)).order_by(Chunk.idx).limit(batch_size))).scalars())
                for c in batch:
                    s.expunge(c)
            if not batch:
                return
            texts = [_embedding_text(d, c) for c in batch]
            vectors = await self.service.upstream.embed(kb.org_id, None, kb.embedding_model,
                                                        texts)
            if vectors and len(vectors[0]) != kb.embedding_dim:
                raise ValueError(f"the embedding model now answers {len(vectors[0])} "
                                 f"dimensions; this knowledge base has {kb.embedding_dim}")
            self._unflushed.add(kb.id)
            await self.service.vectors.upsert(kb.id, kb.org_id, [
                ChunkVector(chunk_id=str(c.id), document_id=str(d.id), chunk_index=c.idx,
                            vector=v, text=c.text, page=c.page, heading=c.heading,
                            metadata=d.meta or {}) for c, v in zip(batch, vectors, strict=True)])
            postings = [{"chunk_id": c.id, "term": term, "kb_id": kb.id, "tf": tf}
                        for c in batch for term, tf in bm25.term_frequencies(c.text).items()
                        if len(term) <= 100]
            ids = [c.id for c in batch]
            async with self.db.transaction() as s:
                await self._renew(s, d)
                await s.execute(Posting.__table__.delete().where(Posting.chunk_id.in_(ids)))
                for start in range(0, len(postings), 2000):
                    await s.execute(Posting.__table__.insert(), postings[start:start + 2000])
                await s.execute(update(Chunk).where(Chunk.id.in_(ids)).values(indexed=True))
                done = int((await s.execute(select(func.count()).select_from(Chunk).where(
                    Chunk.document_id == d.id, Chunk.generation == d.generation,
                    Chunk.indexed.is_(True)))).scalar_one())
                row = await s.get(Document, d.id)
                assert row is not None
                row.chunks_done = done
                await s.flush()
                await self.service.events.document_progress(s, row)

    async def _go_live(self, d: Document, kb: KnowledgeBase, seconds: float) -> None:
        async with self.db.transaction() as s:
            row = await s.get(Document, d.id)
            if row is None or row.lease_owner != self.owner or row.generation != d.generation:
                raise LeaseLost(str(d.id))
            stale = await self.service.stale_chunks(s, row)
        if stale:
            await self.service.vectors.delete_chunks(kb.id, kb.org_id, [str(i) for i in stale])
        async with self.db.transaction() as s:
            row = await s.get(Document, d.id)
            if row is None or row.lease_owner != self.owner or row.generation != d.generation:
                raise LeaseLost(str(d.id))
            await self.service.drop_chunks(s, stale)
            row.live_generation = row.generation
            row.status, row.error, row.error_code = "indexed", "", ""
            row.lease_owner, row.lease_until = None, None
            row.indexed_at = utcnow()
            await s.flush()
            kb_row = await s.get(KnowledgeBase, kb.id)
            if kb_row is not None:
                await self.service.recount(s, kb_row)
            await self.service.events.document_indexed(s, row, len(stale), round(seconds, 3))
        log.info("indexed %s (%d chunks) in %.1fs", d.name, d.chunks_total, seconds)

    async def _fail(self, doc_id: uuid.UUID, code: str, message: str, *,
                    permanent: bool) -> None:
        async with self.db.transaction() as s:
            row = await s.get(Document, doc_id)
            if row is None or row.lease_owner != self.owner:
                return
            row.lease_owner, row.lease_until = None, None
            row.error, row.error_code = message[:2000], code[:50] or "ingestion_failed"
            if permanent or row.attempts >= self.settings.kb_max_attempts:
                row.status = "failed"
                await s.flush()
                await self.service.events.document_failed(s, row)
            else:  # transient (model, store): retried after a pause growing with attempts
                pause = min(60, 2 ** row.attempts)
                row.status = "queued"
                row.lease_until = utcnow() + timedelta(seconds=pause)
                await s.flush()
                self._retry_until = max(self._retry_until, time.monotonic() + pause)


def _embedding_text(d: Document, c: Chunk) -> str:
    """What is embedded: the chunk with where it sits (title and heading help short chunks)."""
    where = " / ".join(x for x in (os.path.splitext(d.name)[0], c.heading) if x)
    return f"{where}\n{c.text}" if where else c.text
