"""services.kb.bm25: analysis (English and CJK), BM25 ranking and reciprocal rank fusion."""
# ruff: noqa: RUF001  (full-width CJK punctuation and typographic quotes are the data)

from __future__ import annotations

import math
from collections import defaultdict

import pytest

from services.kb.bm25 import analyze, bm25_scores, rrf_fuse, term_frequencies, top


def test_analyze_lowercases_drops_stopwords_and_stems_plurals() -> None:
    assert analyze("The Queries of the Users' documents are INDEXED") == [
        "query", "user", "document", "indexed"]
    assert analyze("boxes classes status goes the bus's") == [
        "boxe", "classe", "status", "goes", "bus"]


def test_analyze_normalizes_full_width_and_possessives() -> None:
    assert analyze("ＧＰＵ　Ｓｅｒｖｅｒ's ２０２４") == ["gpu", "server", "2024"]
    assert analyze("max_tokens, top-p=0.9") == ["max", "token", "top", "p", "0", "9"]


def test_cjk_text_becomes_character_bigrams() -> None:
    assert analyze("知识库检索") == ["知识", "识库", "库检", "检索"]
    assert analyze("GPU服务器，很快") == ["gpu", "服务", "务器", "很快"]
    assert analyze("库") == ["库"]
    assert analyze("カタカナ") == ["カタ", "タカ", "カナ"]
    assert analyze("한국어 검색") == ["한국어", "검색"]  # Hangul is written with spaces


def test_term_frequencies_count_and_sum_to_the_length() -> None:
    tf = term_frequencies("Cats and cats and a dog")
    assert tf == {"cat": 2, "dog": 1}
    assert sum(tf.values()) == len(analyze("Cats and cats and a dog"))


def _index(docs: dict[str, str]) -> tuple[dict[str, list[tuple[str, int]]], dict[str, int],
                                          float]:
    postings: dict[str, list[tuple[str, int]]] = defaultdict(list)
    lengths: dict[str, int] = {}
    for chunk_id, text in docs.items():
        tf = term_frequencies(text)
        lengths[chunk_id] = sum(tf.values())
        for term, n in tf.items():
            postings[term].append((chunk_id, n))
    return dict(postings), lengths, sum(lengths.values()) / len(lengths)


DOCS = {
    "a": "The gateway routes requests to the inference service.",
    "b": "The inference service serves models; the gateway checks tokens.",
    "c": "Quantization of models reduces memory; the inference service loads GGUF files.",
    "d": "Datasets are versioned; the data service stores files in object storage.",
    "e": "知识库把文档切分成块，然后建立向量索引和关键词索引。",
    "f": "推理服务加载模型文件，网关负责鉴权。",
}


def _search(query: str) -> list[str]:
    postings, lengths, avg = _index(DOCS)
    scores = bm25_scores(analyze(query), postings, lengths, len(DOCS), avg)
    return top(scores, 10)


def test_the_chunk_with_the_rare_query_term_ranks_first() -> None:
    assert _search("inference service quantization")[0] == "c"
    assert _search("gateway tokens")[0] == "b"
    assert _search("versioned datasets")[:1] == ["d"]


def test_chinese_queries_match_through_bigrams() -> None:
    assert _search("关键词索引") == ["e"]
    assert _search("模型文件在哪里加载")[0] == "f"


def test_no_matching_term_gives_no_scores() -> None:
    assert _search("kubernetes") == []


def test_bm25_matches_the_formula() -> None:
    postings = {"x": [(1, 2), (2, 1)], "y": [(2, 3)]}
    lengths = {1: 10, 2: 20}
    scores = bm25_scores(["x", "y", "x"], postings, lengths, n_docs=4, avg_len=15.0)

    def term(tf: int, df: int, dl: int) -> float:
        idf = math.log(1 + (4 - df + 0.5) / (df + 0.5))
        return idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / 15.0))

    assert scores[1] == pytest.approx(term(2, 2, 10))  # the repeated "x" counts once
    assert scores[2] == pytest.approx(term(1, 2, 20) + term(3, 1, 20))


def test_shorter_chunk_wins_at_equal_term_frequency() -> None:
    postings = {"gpu": [("long", 1), ("short", 1)]}
    scores = bm25_scores(["gpu"], postings, {"long": 200, "short": 10}, 10, 50.0)
    assert scores["short"] > scores["long"]
    flat = bm25_scores(["gpu"], postings, {"long": 200, "short": 10}, 10, 50.0, b=0.0)
    assert flat["short"] == pytest.approx(flat["long"])


def test_doc_freq_overrides_candidate_postings() -> None:
    postings = {"rare": [(1, 1)], "common": [(1, 1)]}
    scores = bm25_scores(["common"], postings, {1: 5}, 100, 5.0, doc_freq={"common": 90})
    rare = bm25_scores(["rare"], postings, {1: 5}, 100, 5.0)
    assert 0 < scores[1] < rare[1]


def test_bm25_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="k1"):
        bm25_scores(["x"], {}, {}, 1, 1.0, b=2.0)


def test_rrf_sums_reciprocal_ranks() -> None:
    fused = rrf_fuse([["a", "b", "c"], ["c", "a", "d"]], k=60)
    assert [key for key, _ in fused] == ["a", "c", "b", "d"]
    scores = dict(fused)
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert scores["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert scores["d"] == pytest.approx(1 / 63)


def test_rrf_weights_and_ties() -> None:
    fused = rrf_fuse([["v1", "v2"], ["k1", "k2"]], k=10, weights=[1.0, 2.0])
    assert [key for key, _ in fused] == ["k1", "k2", "v1", "v2"]
    tie = rrf_fuse([["x"], ["y"]])  # equal scores: the earlier ranking wins, deterministically
    assert [key for key, _ in tie] == ["x", "y"]
    assert rrf_fuse([["a", "a", "b"]]) == [("a", 1 / 61), ("b", 1 / 63)]
    assert rrf_fuse([]) == []


def test_rrf_validates_arguments() -> None:
    with pytest.raises(ValueError, match="weights given"):
        rrf_fuse([["a"]], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="negative"):
        rrf_fuse([["a"]], weights=[-1.0])
    with pytest.raises(ValueError, match="k must be"):
        rrf_fuse([["a"]], k=-1)
