"""The knowledge-base test corpus: enough real documents in every format, headings and pages
kept, and each question's keyword found (after parsing the file back) in its own document only."""

from __future__ import annotations

import collections
from html.parser import HTMLParser
from pathlib import Path

import docx
import pypdf
import pytest

from tests.kb_corpus import Corpus, build_corpus, documents_containing


class _HtmlText(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.headings: list[tuple[int, str]] = []
        self._skip = 0
        self._heading: int | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"h1", "h2", "h3"}:
            self._heading = int(tag[1])
            self.headings.append((self._heading, ""))
        self._skip += tag in {"style", "script"}

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in {"style", "script"}
        if tag in {"h1", "h2", "h3"}:
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            level, text = self.headings[-1]
            self.headings[-1] = (level, text + data)
        if not self._skip:
            self.parts.append(data)


def headings(path: Path) -> list[tuple[int, str]]:
    """The headings a parser finds in an md, html or docx file, in order."""
    if path.suffix == ".docx":
        return [(int(p.style.name.removeprefix("Heading ")), p.text)
                for p in docx.Document(str(path)).paragraphs
                if p.style is not None and p.style.name.startswith("Heading ")]
    if path.suffix == ".html":
        parser = _HtmlText()
        parser.feed(path.read_text(encoding="utf-8"))
        return parser.headings
    found, fenced = [], False
    for line in path.read_text(encoding="utf-8").split("\n"):
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            marks, _, text = line.partition(" ")
            found.append((len(marks), text))
    return found


def extract(path: Path) -> str:
    """The file's text as a parser would see it (not the generator's own copy)."""
    if path.suffix == ".pdf":
        return "\n".join(page.extract_text() for page in pypdf.PdfReader(path).pages)
    if path.suffix == ".docx":
        return "\n".join(p.text for p in docx.Document(str(path)).paragraphs)
    if path.suffix == ".html":
        parser = _HtmlText()
        parser.feed(path.read_text(encoding="utf-8"))
        return " ".join(parser.parts)
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def test_corpus_has_fifty_documents_in_every_format(corpus: Corpus) -> None:
    assert len(corpus.files) >= 50
    assert all(p.is_file() and p.stat().st_size > 300 for p in corpus.files)
    formats = collections.Counter(p.suffix for p in corpus.files)
    for fmt in (".txt", ".md", ".html", ".pdf", ".docx"):
        assert formats[fmt] >= 5, formats
    assert formats[".csv"] >= 2 and formats[".jsonl"] >= 2, formats


def test_documents_keep_headings_and_pages(corpus: Corpus) -> None:
    structured = 0
    for path in corpus.files:
        if path.suffix == ".pdf":
            assert len(pypdf.PdfReader(path).pages) >= 2, path.name
        elif path.suffix in {".md", ".html", ".docx"}:
            found = headings(path)
            assert found == corpus.headings[path.name], path.name
            assert len(found) >= 2 and found[0][0] == 1, (path.name, found)
            assert {level for level, _ in found} >= {1, 2}, (path.name, found)
            structured += 1
    assert structured >= 15


def test_documents_are_real_text(corpus: Corpus) -> None:
    words = sum(len(extract(p).split()) for p in corpus.files)
    assert words > 40_000
    assert "lorem ipsum" not in " ".join(corpus.texts.values()).lower()


def test_each_answer_keyword_is_in_exactly_its_document(corpus: Corpus) -> None:
    assert len(corpus.questions) == 20
    extracted = {p.name: extract(p) for p in corpus.files}
    for q in corpus.questions:
        assert documents_containing(q.answer_keyword, extracted) == [q.document], q
    # The questions are asked in the user's words, not copied from the answer.
    for q in corpus.questions:
        assert q.text.lower() not in " ".join(extracted[q.document].split()).lower()
    formats = {Path(q.document).suffix for q in corpus.questions}
    assert formats == {".pdf", ".docx", ".html", ".md", ".txt", ".csv", ".jsonl"}


def test_corpus_without_debian_licenses_still_holds(tmp_path: Path) -> None:
    corpus = build_corpus(tmp_path / "c", licenses=tmp_path / "no-such-folder")
    assert len(corpus.files) >= 50
    assert not any(p.name.startswith("license-") for p in corpus.files)
    assert len(corpus.questions) == 20


def test_a_keyword_found_in_two_documents_is_refused(tmp_path: Path) -> None:
    from tests.kb_corpus import Question

    with pytest.raises(AssertionError, match="keyword"):
        build_corpus(tmp_path / "c", questions=[
            Question("What is a keyword-only argument?", "python-function.html",
                     "keyword-only")])
