"""The kb service's vector store against a real milvus-lite folder (and a real `milvus-lite
server` over gRPC): ranking, thresholds, filters, deletes, upserts, and org isolation — including
filters crafted to reach another organization's chunks."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.kb.vectors import (
    ChunkVector,
    CollectionMissing,
    VectorStore,
    collection_name,
    metadata_filter_expr,
)
from workbench.devservers import ServerProcess, free_port, wait_for_port
from workbench.errors import Conflict, ValidationFailed

DIM = 4


def unit(angle_deg: float) -> list[float]:
    """A unit vector in the first plane at `angle_deg` from [1, 0, 0, 0]: its cosine
    similarity to that axis is cos(angle)."""
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a), 0.0, 0.0]


def chunks(doc: uuid.UUID, angles: list[float], **meta: Any) -> list[ChunkVector]:
    return [ChunkVector(chunk_id=f"{doc}:{i}", document_id=str(doc), chunk_index=i,
                        vector=unit(a), text=f"chunk {i} at {a} degrees", page=i + 1,
                        heading=f"Section {i}", metadata={"angle": a, **meta})
            for i, a in enumerate(angles)]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[VectorStore]:
    s = VectorStore(str(tmp_path / "vectors.db"))
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def ids() -> dict[str, uuid.UUID]:
    return {k: uuid.uuid4() for k in ("kb", "kb2", "org", "org2", "doc", "doc2", "doc3")}


async def test_milvus_lite_starts_fast(tmp_path: Path) -> None:
    s = VectorStore(str(tmp_path / "start.db"))
    t = time.perf_counter()
    await s.start()
    started = time.perf_counter() - t
    await s.close()
    print(f"milvus-lite started in {started:.2f} s")
    assert started < 10


async def test_search_ranks_by_cosine_similarity(store: VectorStore,
                                                 ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [60, 0, 90, 30, 45]))
    hits = await store.search(ids["kb"], ids["org"], unit(0), top_k=5)
    assert [h.metadata["angle"] for h in hits] == [0, 30, 45, 60, 90]
    for h in hits:
        assert h.score == pytest.approx(math.cos(math.radians(h.metadata["angle"])), abs=1e-4)
    best = hits[0]
    assert (best.chunk_id, best.document_id, best.chunk_index) == (f"{ids['doc']}:1",
                                                                   str(ids["doc"]), 1)
    assert (best.text, best.page, best.heading) == ("chunk 1 at 0 degrees", 2, "Section 1")
    assert [h.metadata["angle"] for h in await store.search(ids["kb"], ids["org"], unit(0),
                                                             top_k=2)] == [0, 30]


async def test_score_threshold_leaves_out_weak_hits(store: VectorStore,
                                                    ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0, 30, 45, 60, 90]))
    hits = await store.search(ids["kb"], ids["org"], unit(0), top_k=5, score_threshold=0.8)
    assert [h.metadata["angle"] for h in hits] == [0, 30]  # cos 45° = 0.707 < 0.8
    assert await store.search(ids["kb"], ids["org"], unit(180), 5, score_threshold=0.1) == []


async def test_metadata_filters_match_values_lists_and_types(
        store: VectorStore, ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    rows = [ChunkVector(f"c{i}", str(ids["doc"]), i, unit(i * 10), metadata=m) for i, m in
            enumerate([{"lang": "en", "year": 2020, "public": True, "score": 0.5},
                       {"lang": "de", "year": 2021, "public": False, "score": 1.5},
                       {"lang": "fr", "year": 2020, "public": True},
                       {"lang": "en", "year": 2022, "public": False},
                       {"other": "x"}])]
    await store.upsert(ids["kb"], ids["org"], rows)

    async def found(filters: dict[str, Any]) -> list[str]:
        return sorted(h.chunk_id for h in await store.search(ids["kb"], ids["org"], unit(0), 10,
                                                              filters=filters))

    assert await found({"lang": "en"}) == ["c0", "c3"]
    assert await found({"lang": ["de", "fr"]}) == ["c1", "c2"]
    assert await found({"year": 2020, "public": True}) == ["c0", "c2"]
    assert await found({"public": False}) == ["c1", "c3"]
    assert await found({"score": 1.5}) == ["c1"]
    assert await found({"lang": "en", "year": [2021, 2022]}) == ["c3"]
    assert await found({"missing": "x"}) == []
    assert await found({}) == ["c0", "c1", "c2", "c3", "c4"]


async def test_document_ids_restrict_the_search(store: VectorStore,
                                                ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0, 10]))
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc2"], [5]))
    hits = await store.search(ids["kb"], ids["org"], unit(0), 10, document_ids=[ids["doc2"]])
    assert [h.document_id for h in hits] == [str(ids["doc2"])]
    assert await store.search(ids["kb"], ids["org"], unit(0), 10, document_ids=[]) == []


async def test_delete_document_removes_its_vectors(store: VectorStore,
                                                   ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0, 10, 20]))
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc2"], [40, 50]))
    assert await store.count(ids["kb"], ids["org"]) == 5
    assert await store.delete_document(ids["kb"], ids["org"], ids["doc"]) == 3
    assert await store.count(ids["kb"], ids["org"], ids["doc"]) == 0
    assert await store.count(ids["kb"], ids["org"], ids["doc2"]) == 2
    hits = await store.search(ids["kb"], ids["org"], unit(0), 10)
    assert {h.document_id for h in hits} == {str(ids["doc2"])}
    assert await store.delete_document(ids["kb"], ids["org"], ids["doc"]) == 0


async def test_delete_chunks_removes_only_those(store: VectorStore,
                                                ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0, 10, 20]))
    assert await store.delete_chunks(ids["kb"], ids["org"], [f"{ids['doc']}:0",
                                                             f"{ids['doc']}:2", "nope"]) == 2
    assert [h.chunk_index for h in await store.search(ids["kb"], ids["org"], unit(0), 5)] == [1]
    with pytest.raises(ValidationFailed):
        await store.delete_chunks(ids["kb"], ids["org"], ['x" or chunk_id != "'])


async def test_reupsert_of_same_chunk_ids_replaces_without_duplicates(
        store: VectorStore, ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0, 10, 20]))
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [80, 70, 60], version=2))
    assert await store.count(ids["kb"], ids["org"]) == 3
    hits = await store.search(ids["kb"], ids["org"], unit(0), 10)
    assert [(h.chunk_index, h.metadata) for h in hits] == [
        (2, {"angle": 60, "version": 2}), (1, {"angle": 70, "version": 2}),
        (0, {"angle": 80, "version": 2})]


async def test_headings_are_cut_to_fit_and_may_be_missing(store: VectorStore,
                                                          ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    await store.upsert(ids["kb"], ids["org"], [
        ChunkVector("h1", str(ids["doc"]), 0, unit(0), heading="Überschrift " * 200),
        ChunkVector("h2", str(ids["doc"]), 1, unit(10), heading=None, page=None)])
    first, second = await store.search(ids["kb"], ids["org"], unit(0), 2)
    assert len(first.heading.encode()) <= 1024 and first.heading.startswith("Überschrift")
    assert (second.heading, second.page) == ("", None)
    with pytest.raises(ValidationFailed):
        await store.upsert(ids["kb"], ids["org"], [
            ChunkVector("big", str(ids["doc"]), 2, unit(0), text="x" * 70_000)])


async def test_replace_document_drops_its_stale_chunks(store: VectorStore,
                                                       ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0, 10, 20, 30]))
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc2"], [5]))
    stale = await store.replace_document(ids["kb"], ids["org"], ids["doc"],
                                         chunks(ids["doc"], [50, 60]))
    assert stale == 2
    assert await store.count(ids["kb"], ids["org"], ids["doc"]) == 2
    assert await store.count(ids["kb"], ids["org"], ids["doc2"]) == 1
    assert await store.replace_document(ids["kb"], ids["org"], ids["doc"], []) == 2
    assert await store.count(ids["kb"], ids["org"]) == 1
    with pytest.raises(ValidationFailed):
        await store.replace_document(ids["kb"], ids["org"], ids["doc"], chunks(ids["doc2"], [1]))


async def test_other_org_sees_counts_and_deletes_nothing(store: VectorStore,
                                                         ids: dict[str, uuid.UUID]) -> None:
    kb, mine, theirs = ids["kb"], ids["org"], ids["org2"]
    await store.ensure_collection(kb, DIM)
    await store.upsert(kb, mine, chunks(ids["doc"], [0, 10]))
    assert await store.search(kb, theirs, unit(0), 10) == []
    assert await store.count(kb, theirs) == 0
    assert await store.count(kb, theirs, ids["doc"]) == 0
    assert await store.delete_document(kb, theirs, ids["doc"]) == 0
    assert await store.delete_chunks(kb, theirs, [f"{ids['doc']}:0"]) == 0
    assert await store.replace_document(kb, theirs, ids["doc"], []) == 0
    assert await store.count(kb, mine) == 2
    # Taking over another org's chunk ids by upsert is refused, and changes nothing.
    with pytest.raises(Conflict):
        await store.upsert(kb, theirs, chunks(ids["doc"], [90]))
    assert [h.metadata["angle"] for h in await store.search(kb, mine, unit(0), 10)] == [0, 10]
    with pytest.raises(Conflict):
        await store.drop(kb, theirs)
    assert await store.count(kb, mine) == 2


CRAFTED_VALUES = [
    'a" or org_id != "',
    'a\\" or org_id != \\"',
    "a' or org_id != '",
    '" or 1 == 1 or metadata["tag"] == "',
    'x") or (org_id != "',
    "a\\",
    'a\\\\" or true or "',
    "en\n or org_id != ''",
]
CRAFTED_KEYS = ["org_id", "kb_id", "1 or 1", 'tag"] == "a" or org_id != "', "tag or true",
                "", "x" * 65, "tag)", "tag\n", "ORG_ID; drop"]


async def _two_orgs_in_one_collection(store: VectorStore,
                                      ids: dict[str, uuid.UUID]) -> None:
    # The service never mixes orgs in one collection; here they are, so that a filter that
    # escaped the org scope would have something to find.
    await store.ensure_collection(ids["kb"], DIM)
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0], tag="mine"))
    await store.upsert(ids["kb"], ids["org2"], chunks(ids["doc2"], [1, 2], tag="secret"))


@pytest.mark.parametrize("value", CRAFTED_VALUES)
async def test_crafted_filter_values_stay_inside_the_org(store: VectorStore,
                                                         ids: dict[str, uuid.UUID],
                                                         value: str) -> None:
    await _two_orgs_in_one_collection(store, ids)
    for filters in ({"tag": value}, {"tag": [value, "mine"]}, {"lang": value, "tag": "mine"}):
        hits = await store.search(ids["kb"], ids["org"], unit(0), 10, filters=filters)
        assert {h.document_id for h in hits} <= {str(ids["doc"])}
    assert await store.count(ids["kb"], ids["org2"]) == 2


@pytest.mark.parametrize("key", CRAFTED_KEYS)
async def test_crafted_filter_keys_are_refused(store: VectorStore, ids: dict[str, uuid.UUID],
                                               key: str) -> None:
    await _two_orgs_in_one_collection(store, ids)
    with pytest.raises(ValidationFailed):
        await store.search(ids["kb"], ids["org"], unit(0), 10, filters={key: str(ids["org2"])})


@pytest.mark.parametrize("filters", [
    {"tag": {"$ne": "x"}}, {"tag": ["mine", ["secret"]]}, {"tag": []}, {"tag": None},
    {"tag": b"secret"}, {"tag": "a\x00b"}, {"tag": float("nan")}, {"n": 2**70},
    {"tag": "x" * 2000}, {f"k{i}": 1 for i in range(17)}, {"tag": list(range(101))},
])
async def test_malformed_filters_are_refused(store: VectorStore, ids: dict[str, uuid.UUID],
                                             filters: dict[str, Any]) -> None:
    await _two_orgs_in_one_collection(store, ids)
    with pytest.raises(ValidationFailed):
        await store.search(ids["kb"], ids["org"], unit(0), 10, filters=filters)


async def test_quotes_and_backslashes_in_values_match_exactly(
        store: VectorStore, ids: dict[str, uuid.UUID]) -> None:
    """Escaping is right, not merely failing closed: a value with quotes, backslashes, a
    newline, a tab and non-ASCII finds exactly the chunk that holds it."""
    tricky = 'he said "hi" \\ it\'s\n\ta 引号 \\"'
    await store.ensure_collection(ids["kb"], DIM)
    await store.upsert(ids["kb"], ids["org"], [
        ChunkVector("t1", str(ids["doc"]), 0, unit(0), metadata={"note": tricky}),
        ChunkVector("t2", str(ids["doc"]), 1, unit(0), metadata={"note": tricky[:-1]})])
    hits = await store.search(ids["kb"], ids["org"], unit(0), 10, filters={"note": tricky})
    assert [h.chunk_id for h in hits] == ["t1"]
    assert hits[0].metadata["note"] == tricky


def test_filter_expression_is_built_from_validated_parts() -> None:
    assert metadata_filter_expr({"lang": ["en", 'a"b'], "n": 3, "ok": True}) == (
        '(metadata["lang"] == "en" or metadata["lang"] == "a\\"b") and '
        'metadata["n"] == 3 and metadata["ok"] == true')
    assert metadata_filter_expr(None) == ""


@pytest.mark.parametrize("bad", ["kb", "1 or 1", 'x" or "', "", "../../etc"])
async def test_ids_that_are_not_uuids_are_refused(store: VectorStore,
                                                  ids: dict[str, uuid.UUID], bad: str) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    with pytest.raises(ValidationFailed):
        await store.search(ids["kb"], bad, unit(0), 5)
    with pytest.raises(ValidationFailed):
        await store.search(bad, ids["org"], unit(0), 5)
    with pytest.raises(ValidationFailed):
        await store.delete_document(ids["kb"], ids["org"], bad)
    with pytest.raises(ValidationFailed):
        await store.upsert(ids["kb"], ids["org"], [ChunkVector("c", bad, 0, unit(0))])


async def test_two_knowledge_bases_are_separate(store: VectorStore,
                                                ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    await store.ensure_collection(ids["kb2"], DIM)
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0, 10]))
    await store.upsert(ids["kb2"], ids["org"], chunks(ids["doc2"], [5]))
    assert {h.document_id for h in await store.search(ids["kb"], ids["org"], unit(0), 10)} == {
        str(ids["doc"])}
    assert {h.document_id for h in await store.search(ids["kb2"], ids["org"], unit(0), 10)} == {
        str(ids["doc2"])}
    assert await store.delete_document(ids["kb2"], ids["org"], ids["doc"]) == 0
    assert await store.count(ids["kb"], ids["org"]) == 2
    assert collection_name(ids["kb"]) == "kb_" + ids["kb"].hex


async def test_drop_removes_the_collection(store: VectorStore,
                                           ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    await store.ensure_collection(ids["kb2"], DIM)
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0]))
    await store.upsert(ids["kb2"], ids["org"], chunks(ids["doc2"], [0]))
    assert await store.drop(ids["kb"], ids["org"]) is True
    assert await store.drop(ids["kb"], ids["org"]) is False
    assert await store.search(ids["kb"], ids["org"], unit(0), 5) == []
    assert await store.count(ids["kb"], ids["org"]) == 0
    assert await store.delete_document(ids["kb"], ids["org"], ids["doc"]) == 0
    with pytest.raises(CollectionMissing):
        await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0]))
    assert await store.count(ids["kb2"], ids["org"]) == 1


async def test_a_collection_keeps_its_dimension(store: VectorStore,
                                                ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    await store.ensure_collection(ids["kb"], DIM)
    with pytest.raises(Conflict):
        await store.ensure_collection(ids["kb"], DIM + 1)
    with pytest.raises(ValidationFailed):
        await store.ensure_collection(ids["kb2"], 0)


async def test_vectors_survive_a_restart(tmp_path: Path, ids: dict[str, uuid.UUID]) -> None:
    path = str(tmp_path / "persist.db")
    first = VectorStore(path)
    await first.ensure_collection(ids["kb"], DIM)
    await first.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0, 10, 20]))
    await first.delete_chunks(ids["kb"], ids["org"], [f"{ids['doc']}:1"])
    await first.close()
    second = VectorStore(path)
    try:
        hits = await second.search(ids["kb"], ids["org"], unit(0), 10)
        assert [h.chunk_index for h in hits] == [0, 2]
    finally:
        await second.close()


PROBE = textwrap.dedent("""
    import sys
    from pymilvus import MilvusClient
    try:
        MilvusClient(sys.argv[1]).list_collections()
    except Exception as e:
        print("REFUSED", type(e).__name__, e)
        sys.exit(3)
    print("OPENED")
""")


async def test_a_second_process_cannot_open_the_same_lite_folder(
        store: VectorStore, ids: dict[str, uuid.UUID]) -> None:
    """milvus-lite locks its folder (flock): the embedded mode must keep every user of the
    vector store in one process."""
    await store.ensure_collection(ids["kb"], DIM)
    probe = subprocess.run([sys.executable, "-c", PROBE, store.uri], capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode == 3, probe.stdout + probe.stderr
    assert "REFUSED" in probe.stdout
    await store.close()
    probe = subprocess.run([sys.executable, "-c", PROBE, store.uri], capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode == 0 and "OPENED" in probe.stdout, probe.stdout + probe.stderr


async def test_concurrent_calls_from_many_tasks(store: VectorStore,
                                                ids: dict[str, uuid.UUID]) -> None:
    await store.ensure_collection(ids["kb"], DIM)
    docs = [uuid.uuid4() for _ in range(20)]

    async def write(doc: uuid.UUID, angle: float) -> None:
        await store.upsert(ids["kb"], ids["org"], chunks(doc, [angle, angle + 1]))

    await asyncio.gather(*(write(d, i * 4.0) for i, d in enumerate(docs)))
    results = await asyncio.gather(*(store.search(ids["kb"], ids["org"], unit(i * 4.0), 1)
                                     for i in range(20)))
    assert [r[0].document_id for r in results] == [str(d) for d in docs]
    assert await store.count(ids["kb"], ids["org"]) == 40


async def test_the_same_code_works_over_grpc_against_milvus_lite_server(
        tmp_path: Path, ids: dict[str, uuid.UUID]) -> None:
    """The distributed mode's code path (an http:// URI, no in-process server) against the
    `milvus-lite server` command; a real Milvus server is not available on this machine."""
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "milvus_lite", "server", "--data-dir",
                            str(tmp_path / "served"), "--host", "127.0.0.1", "--port",
                            str(port)], env={"PATH": "/usr/bin:/bin"},
                           log=tmp_path / "milvus-lite.log").start()
    try:
        wait_for_port(port, timeout=60)
        store = VectorStore(f"http://127.0.0.1:{port}")
        try:
            await store.ensure_collection(ids["kb"], DIM)
            await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [30, 0], tag="a"))
            hits = await store.search(ids["kb"], ids["org"], unit(0), 5, filters={"tag": "a"})
            assert [h.chunk_index for h in hits] == [1, 0]
            assert await store.search(ids["kb"], ids["org2"], unit(0), 5) == []
            assert await store.delete_document(ids["kb"], ids["org"], ids["doc"]) == 2
            assert await store.drop(ids["kb"], ids["org"]) is True
        finally:
            await store.close()
    finally:
        server.stop()


async def test_embedded_searches_answer_as_the_grpc_server_does(
        store: VectorStore, ids: dict[str, uuid.UUID]) -> None:
    """In embedded mode a search goes straight to milvus-lite's engine in this process, not
    through its gRPC server: the same hits, scores and fields as the client's search, with
    filters, document restrictions and without the text."""
    from services.kb import vectors

    await store.ensure_collection(ids["kb"], DIM)
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc"], [0, 10, 20, 30, 40], tag="a"))
    await store.upsert(ids["kb"], ids["org"], chunks(ids["doc2"], [5, 15, 25], tag="b"))
    await store.upsert(ids["kb"], ids["org2"], chunks(ids["doc3"], [1, 2], tag="a"))  # foreign
    assert store._lite is not None
    client = await store._connected()
    cases: list[tuple[float, dict[str, Any] | None, list[uuid.UUID] | None, bool]] = [
        (0, None, None, True), (12, {"tag": "b"}, None, True),
        (33, {"tag": ["a", "b"]}, None, False), (3, None, [ids["doc2"]], False)]
    for angle, filters, docs, with_text in cases:
        native = await store.search(ids["kb"], ids["org"], unit(angle), 4, filters=filters,
                                    document_ids=docs, with_text=with_text)
        expr = store._scope(ids["kb"], ids["org"])
        if docs:
            expr += " and " + vectors._in_list("document_id", [str(d) for d in docs])
        if filters:
            expr += f" and ({metadata_filter_expr(filters)})"
        raw = client.search(store.name(ids["kb"]), data=[unit(angle)], limit=4, filter=expr,
                            output_fields=vectors._OUTPUT_FIELDS if with_text
                            else vectors._ID_FIELDS, anns_field="vector",
                            search_params={"metric_type": "COSINE"})
        served = [vectors._hit(h) for h in raw[0]]
        assert native and len(native) == len(served)
        for a, b in zip(native, served, strict=True):
            assert (a.chunk_id, a.document_id, a.chunk_index, a.text, a.page, a.heading,
                    a.metadata) == (b.chunk_id, b.document_id, b.chunk_index, b.text, b.page,
                                    b.heading, b.metadata)
            assert abs(a.score - b.score) < 1e-6
        assert all(h.document_id != str(ids["doc3"]) for h in native)
