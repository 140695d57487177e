"""services.kb.chunking: sizes in real tokens, overlap, structure kept, determinism."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from services.kb.chunking import (
    BUILTIN_TOKENIZER,
    Chunk,
    CountTokens,
    approximate_token_count,
    chunk,
    tokenizer_counter,
)
from services.kb.parsing import ParsedDocument, Section


@pytest.fixture(scope="module")
def minilm() -> CountTokens:
    return tokenizer_counter(BUILTIN_TOKENIZER)


@pytest.fixture(params=["minilm", "approximate"])
def counter(request: pytest.FixtureRequest, minilm: CountTokens) -> CountTokens:
    return minilm if request.param == "minilm" else approximate_token_count


def _doc(*sections: Section) -> ParsedDocument:
    return ParsedDocument(format="txt", title="t", sections=list(sections))


ENGLISH = " ".join(
    f"Sentence number {i} explains how the knowledge base indexes document {i % 7} for "
    f"retrieval{'!' if i % 5 == 0 else '.'}" + ("\n\n" if i % 6 == 5 else "")
    for i in range(120))
CHINESE = "".join(f"第{i}句话介绍知识库如何把文档切分成块并建立索引。" for i in range(80))
OTHER_SCRIPTS = ("지식베이스는문서를검색합니다 " * 40
                 + "ナレッジベースはドキュメントを検索します。" * 40
                 + "Ünïcödé façade naïveté \u2013 “quotes” " * 30)
MESSY = ("word " * 300 + "x" * 5000 + " supercalifragilisticexpialidocious" * 40
         + "\n" + "没有标点的中文长句" * 120 + "\n\nshort tail.")


def _words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


@pytest.mark.parametrize("size,overlap", [(16, 0), (16, 8), (64, 16), (256, 50)])
@pytest.mark.parametrize("strategy", ["recursive", "fixed", "paragraph"])
def test_chunks_never_exceed_chunk_size(counter: CountTokens, strategy: str, size: int,
                                        overlap: int) -> None:
    doc = _doc(Section(ENGLISH, ["A"], 1), Section(CHINESE, ["B"], 2), Section(MESSY, ["C"], 3),
               Section(OTHER_SCRIPTS, ["D"], 4))
    chunks = chunk(doc, strategy=strategy, chunk_size=size, chunk_overlap=overlap,
                   count_tokens=counter)
    assert chunks
    for c in chunks:
        assert c.text and c.text == c.text.strip()
        assert c.token_count == counter(c.text)
        assert c.token_count <= size, (c.token_count, c.text)
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_single_unsplittable_character_may_exceed_the_size() -> None:
    def heavy_euro(text: str) -> int:
        return approximate_token_count(text) + 29 * text.count("€")

    doc = _doc(Section("price € now"))
    chunks = chunk(doc, strategy="recursive", chunk_size=16, chunk_overlap=0,
                   count_tokens=heavy_euro)
    assert [c.text for c in chunks] == ["price", "€", "now"]
    assert [c.token_count for c in chunks] == [1, 30, 1]


def test_small_neighbours_are_merged_within_a_section(minilm: CountTokens) -> None:
    doc = _doc(Section("One.\n\nTwo.\n\nThree.", ["H"]), Section("Four.", ["Other"]))
    chunks = chunk(doc, strategy="recursive", chunk_size=64, chunk_overlap=8,
                   count_tokens=minilm)
    assert [(c.text, c.heading_path) for c in chunks] == [
        ("One.\n\nTwo.\n\nThree.", ["H"]), ("Four.", ["Other"])]


def test_no_overlap_keeps_every_word_exactly_once(counter: CountTokens) -> None:
    doc = _doc(Section(ENGLISH), Section(CHINESE, ["zh"]))
    chunks = chunk(doc, strategy="recursive", chunk_size=48, chunk_overlap=0,
                   count_tokens=counter)
    joined = "".join("".join(_words(c.text)) for c in chunks)
    assert joined == "".join(_words(ENGLISH)) + "".join(_words(CHINESE))


def test_overlap_repeats_the_previous_chunk_tail_on_a_sentence_boundary(
        minilm: CountTokens) -> None:
    doc = _doc(Section(ENGLISH.replace("\n\n", " ")))
    chunks = chunk(doc, strategy="recursive", chunk_size=64, chunk_overlap=20,
                   count_tokens=minilm)
    assert len(chunks) > 5
    for prev, nxt in itertools.pairwise(chunks):
        shared = _shared_prefix(prev.text, nxt.text)
        assert shared, (prev.text, nxt.text)
        assert shared.startswith("Sentence number")  # a sentence start, not mid-sentence
        assert 0 < minilm(shared) <= 20
        assert len(shared) < len(prev.text)


def test_overlap_in_chinese_uses_cjk_sentence_ends(minilm: CountTokens) -> None:
    chunks = chunk(_doc(Section(CHINESE)), strategy="recursive", chunk_size=64,
                   chunk_overlap=24, count_tokens=minilm)
    assert len(chunks) > 3
    for prev, nxt in itertools.pairwise(chunks):
        assert prev.text.endswith("。")
        shared = _shared_prefix(prev.text, nxt.text)
        assert shared.startswith("第") and shared.endswith("。")


def test_overlap_falls_back_to_word_boundaries(minilm: CountTokens) -> None:
    text = " ".join(f"token{i}" for i in range(400))  # no sentence ends at all
    chunks = chunk(_doc(Section(text)), strategy="recursive", chunk_size=40, chunk_overlap=10,
                   count_tokens=minilm)
    for prev, nxt in itertools.pairwise(chunks):
        shared = _shared_prefix(prev.text, nxt.text)
        assert shared and re.fullmatch(r"(token\d+ ?)+", shared)
        assert 5 <= minilm(shared) <= 10


def _shared_prefix(prev: str, nxt: str) -> str:
    """The longest start of `nxt` that `prev` ends with."""
    for n in range(min(len(prev), len(nxt)), 0, -1):
        if prev.endswith(nxt[:n]):
            return nxt[:n]
    return ""


def test_chunks_keep_heading_path_and_start_page(minilm: CountTokens) -> None:
    page_text = " ".join(f"Line {i} of the manual page." for i in range(30))
    setup = ["Manual", "Setup"]
    doc = _doc(Section(page_text, setup, 4), Section(page_text, setup, 5),
               Section("Last words.", ["Manual", "FAQ"], 5))
    chunks = chunk(doc, strategy="recursive", chunk_size=100, chunk_overlap=0,
                   count_tokens=minilm)
    setup = [c for c in chunks if c.heading_path == ["Manual", "Setup"]]
    assert {c.page for c in setup} == {4, 5}
    assert setup[0].page == 4 and setup[-1].page == 5
    spanning = [c for c in setup if "page.\n\nLine 0" in c.text]
    assert len(spanning) == 1 and spanning[0].page == 4  # starts on page 4, ends on 5
    assert chunks[-1].heading_path == ["Manual", "FAQ"] and chunks[-1].page == 5
    assert chunks[-1].text == "Last words."


def test_chunking_is_deterministic(minilm: CountTokens) -> None:
    doc = _doc(Section(ENGLISH, ["A"], 1), Section(CHINESE, ["B"], 2), Section(MESSY))
    for strategy in ("recursive", "fixed", "paragraph"):
        runs = [chunk(doc, strategy=strategy, chunk_size=50, chunk_overlap=10,
                      count_tokens=minilm) for _ in range(2)]
        assert runs[0] == runs[1]


def test_fixed_windows_ignore_structure_and_overlap(minilm: CountTokens) -> None:
    one = " ".join(f"alpha{i}" for i in range(30))  # "alpha", "##12": two tokens a word
    two = " ".join(f"beta{i}" for i in range(30))
    doc = _doc(Section(one, ["One"], 1), Section(two, ["Two"], 2))
    chunks = chunk(doc, strategy="fixed", chunk_size=20, chunk_overlap=5, count_tokens=minilm)
    assert all(18 <= c.token_count <= 20 for c in chunks[:-1])
    for prev, nxt in itertools.pairwise(chunks):
        assert 3 <= minilm(_shared_prefix(prev.text, nxt.text)) <= 5
    crossing = [c for c in chunks if "alpha" in c.text and "beta" in c.text]
    assert len(crossing) == 1  # the windows run across the section boundary
    assert crossing[0].heading_path == ["One"] and crossing[0].page == 1
    assert chunks[-1].heading_path == ["Two"] and chunks[-1].page == 2
    assert chunks[-1].text.endswith("beta29")


def test_fixed_windows_do_not_cut_words(minilm: CountTokens) -> None:
    text = " ".join(["internationalization", "tokenization", "decentralized"] * 40)
    chunks = chunk(_doc(Section(text)), strategy="fixed", chunk_size=16, chunk_overlap=0,
                   count_tokens=minilm)
    words = {"internationalization", "tokenization", "decentralized"}
    assert all(set(c.text.split()) <= words for c in chunks)


def test_paragraph_strategy_one_chunk_per_paragraph(minilm: CountTokens) -> None:
    long_paragraph = " ".join(f"Long paragraph sentence {i}." for i in range(40))
    doc = _doc(Section(f"First.\n\nSecond one.\n\n{long_paragraph}\n\nLast.", ["P"], 2))
    chunks = chunk(doc, strategy="paragraph", chunk_size=32, chunk_overlap=8,
                   count_tokens=minilm)
    assert [c.text for c in chunks[:2]] == ["First.", "Second one."]
    assert chunks[-1].text == "Last."
    middle = chunks[2:-1]
    assert len(middle) > 3 and all(c.text.startswith("Long paragraph") for c in middle)
    assert all(c.heading_path == ["P"] and c.page == 2 for c in chunks)


@pytest.mark.parametrize("kwargs,message", [
    ({"strategy": "semantic"}, "unknown chunking strategy"),
    ({"chunk_size": 8}, "chunk_size must be between"),
    ({"chunk_size": 100_000}, "chunk_size must be between"),
    ({"chunk_overlap": -1}, "chunk_overlap must be"),
    ({"chunk_overlap": 64}, "chunk_overlap must be"),
])
def test_invalid_arguments_are_value_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"strategy": "recursive", "chunk_size": 64, "chunk_overlap": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        chunk(_doc(Section("x")), count_tokens=approximate_token_count, **args)  # type: ignore[arg-type]


def test_empty_document_gives_no_chunks() -> None:
    assert chunk(_doc(), strategy="recursive", chunk_size=64, chunk_overlap=0,
                 count_tokens=approximate_token_count) == []


def test_chunk_objects_carry_their_fields(minilm: CountTokens) -> None:
    [c] = chunk(_doc(Section("Hello world.", ["H1", "H2"], 7)), strategy="recursive",
                chunk_size=16, chunk_overlap=0, count_tokens=minilm)
    assert c == Chunk(index=0, text="Hello world.", heading_path=["H1", "H2"], page=7,
                      token_count=3)


def test_minilm_counter_counts_wordpiece_tokens_without_specials(minilm: CountTokens) -> None:
    assert minilm("") == 0
    assert minilm("hello world") == 2
    assert minilm("知识库") == 3  # BERT tokenizers split CJK into characters
    assert minilm("word " * 1000) == 1000  # no truncation at the model's 256/512 limit
    assert tokenizer_counter(BUILTIN_TOKENIZER) is minilm  # loaded once


def test_tokenizer_counter_accepts_a_folder_or_file(minilm: CountTokens,
                                                    tmp_path: Path) -> None:
    from services.kb.chunking import _tokenizer_file

    path = _tokenizer_file(BUILTIN_TOKENIZER)
    assert path.name == "tokenizer.json"
    assert tokenizer_counter(path.parent)("hello world") == 2
    assert tokenizer_counter(str(path))("hello world") == 2
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        tokenizer_counter(str(tmp_path))


def test_approximate_counter_is_close_to_minilm_and_errs_high(minilm: CountTokens) -> None:
    for text in (ENGLISH, CHINESE):
        real, approx = minilm(text), approximate_token_count(text)
        assert real <= approx <= real * 1.5, (real, approx)
