"""Keyword retrieval: the analyzer that turns text into index terms (stored as postings in SQL,
PostgreSQL and SQLite alike), Okapi BM25 over those postings, and reciprocal rank fusion for
hybrid (vector + keyword) retrieval.

Analysis: NFKC + casefold, Unicode word split, Lucene's English stop words, a minimal plural
stemmer (Lucene's "S" stemmer: queries -> query, documents -> document) and character bigrams
for Chinese and Japanese, which have no spaces between words (Lucene's CJKBigramFilter). The
stemmer is light on purpose: Porter-style stemming conflates unrelated words (university /
universe, general / generous) and mangles names and non-English words, while plurals give most
of the recall gain; the index and every query must use the same analyzer, so changing it means
re-indexing."""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

ANALYZER_VERSION = 1  # stored beside the postings: a change here means re-indexing
MAX_TERM_LENGTH = 64  # longer terms are cut: an index column needs a bound

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET: small, so "not" style words are the only loss.
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then "
    "there these they this to was will with".split())

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_KANA = "\u3040-\u30ff\u31f0-\u31ff"
_CJK = _HAN + _KANA
_APOSTROPHES = "'\u2019"  # ASCII and typographic
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W_{_CJK}]+(?:[{_APOSTROPHES}][^\W_{_CJK}]+)*")


def analyze(text: str) -> list[str]:
    """Index terms of `text`, in order (repeats kept: they are term frequencies)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    terms: list[str] = []
    for m in _TOKEN.finditer(text):
        token = m.group()
        if re.match(f"[{_CJK}]", token):
            if len(token) == 1:
                terms.append(token)
            else:
                terms.extend(token[i:i + 2] for i in range(len(token) - 1))
            continue
        token = re.sub(rf"[{_APOSTROPHES}]s$", "", token).replace("\u2019", "'")
        if token in STOPWORDS:
            continue
        terms.append(_stem(token)[:MAX_TERM_LENGTH])
    return terms


def _stem(word: str) -> str:
    """Lucene's EnglishMinimalStemmer (plural -s, -es, -ies), on ASCII words only."""
    if len(word) < 3 or word[-1] != "s" or not (word.isascii() and word.isalpha()):
        return word
    if word[-2] in "us":
        return word
    if word[-2] == "e":
        if len(word) > 3 and word[-3] == "i" and word[-4] not in "ae":
            return word[:-3] + "y"
        if word[-3] in "iaoe":
            return word
    return word[:-1]


def term_frequencies(text: str) -> dict[str, int]:
    """term -> count in `text`, in order of first occurrence; the sum is the document length
    that BM25 expects in `doc_len`."""
    return dict(Counter(analyze(text)))


def bm25_scores(query_terms: Iterable[str], postings: Mapping[str, Sequence[tuple[K, int]]],
                doc_len: Mapping[K, int], n_docs: int, avg_len: float, k1: float = 1.2,
                b: float = 0.75, doc_freq: Mapping[str, int] | None = None) -> dict[K, float]:
    """Okapi BM25 of each chunk that holds a query term. `postings` lists (chunk_id, tf) per
    term over the whole collection (n_docs chunks of average length avg_len); pass `doc_freq`
    when postings were cut to a candidate set, so idf still sees the whole collection. Repeated
    query terms count once. idf is Lucene's log(1 + (N - df + 0.5) / (df + 0.5)), never
    negative, so a term found in most chunks still adds a little instead of penalising."""
    if k1 < 0 or not 0 <= b <= 1:
        raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
    avg = avg_len if avg_len > 0 else 1.0
    scores: dict[K, float] = {}
    for term in dict.fromkeys(query_terms):
        entries = postings.get(term) or ()
        if not entries:
            continue
        df = doc_freq[term] if doc_freq is not None and term in doc_freq else len(entries)
        idf = math.log(1.0 + (max(n_docs, df) - df + 0.5) / (df + 0.5))
        for chunk_id, tf in entries:
            if tf <= 0:
                continue
            length = doc_len.get(chunk_id, avg)
            norm = k1 * (1.0 - b + b * length / avg)
            scores[chunk_id] = scores.get(chunk_id, 0.0) + idf * tf * (k1 + 1.0) / (tf + norm)
    return scores


def top(scores: Mapping[K, float], limit: int) -> list[K]:
    """The `limit` best ids by score; ties in the order the mapping holds them."""
    order = {key: i for i, key in enumerate(scores)}
    return sorted(scores, key=lambda key: (-scores[key], order[key]))[:limit]


def rrf_fuse(rankings: Sequence[Sequence[K]], k: int = 60,
             weights: Sequence[float] | None = None) -> list[tuple[K, float]]:
    """Reciprocal rank fusion: each id scores the sum over rankings of weight / (k + rank),
    rank counted from 1; best first. Ties go to the id with the better single rank, then to the
    earlier ranking. An id repeated within one ranking counts at its first place."""
    if k < 0:
        raise ValueError(f"the RRF constant k must be >= 0, got {k}")
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights given for {len(rankings)} rankings")
    if any(w < 0 for w in weights):
        raise ValueError("RRF weights must not be negative")
    scores: dict[K, float] = {}
    best: dict[K, tuple[int, int]] = {}
    for r, (ranking, weight) in enumerate(zip(rankings, weights, strict=True)):
        seen: set[K] = set()
        for rank, key in enumerate(ranking, start=1):
            if key in seen:
                continue
            seen.add(key)
            scores[key] = scores.get(key, 0.0) + weight / (k + rank)
            best[key] = min(best.get(key, (rank, r)), (rank, r))
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]]))
