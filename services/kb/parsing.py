"""Document parsing for knowledge bases: bytes of a txt, md, html, pdf, docx, csv, json or jsonl
file in, plain-text sections with their heading path and page out; typed errors for the rest."""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import unicodedata
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import PurePosixPath
from typing import Any

from workbench.errors import WorkbenchError

FORMATS = ("txt", "md", "html", "pdf", "docx", "csv", "json", "jsonl")

_EXTENSIONS = {
    ".txt": "txt", ".text": "txt", ".log": "txt", ".md": "md", ".markdown": "md", ".mdx": "md",
    ".html": "html", ".htm": "html", ".xhtml": "html", ".pdf": "pdf", ".docx": "docx",
    ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
}
_CONTENT_TYPES = {
    "text/plain": "txt", "text/markdown": "md", "text/x-markdown": "md", "text/html": "html",
    "application/xhtml+xml": "html", "application/pdf": "pdf", "text/csv": "csv",
    "text/tab-separated-values": "csv", "application/json": "json", "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl", "application/x-jsonlines": "jsonl",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
}
# Types we know and refuse, whatever the bytes say.
_UNSUPPORTED_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .gif .bmp .tif .tiff .webp .heic .svg .ico .exe .dll .so .dylib .bin .msi "
    ".zip .gz .tgz .bz2 .xz .7z .rar .tar .doc .xls .xlsx .ppt .pptx .odt .ods .odp .epub .rtf "
    ".mp3 .wav .flac .ogg .mp4 .mov .avi .mkv .webm .parquet .sqlite .db".split())
# Signatures made of bytes no text file starts with.
_BINARY_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "a PNG image", b"\xff\xd8\xff": "a JPEG image",
    b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image", b"\x7fELF": "an executable (ELF)",
    b"\x1f\x8b": "a gzip archive", b"7z\xbc\xaf\x27\x1c": "a 7-Zip archive",
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1": "a legacy Office file (.doc/.xls/.ppt); save it as .docx",
    b"\xca\xfe\xba\xbe": "a compiled program", b"\xcf\xfa\xed\xfe": "an executable (Mach-O)",
}
# Printable signatures: only when the head also looks binary ("MZ Corp" may start a text file).
_PRINTABLE_MAGIC = {
    b"MZ": "a Windows executable", b"GIF87a": "a GIF image", b"GIF89a": "a GIF image",
    b"RIFF": "a RIFF media file (image, audio or video)", b"ID3": "an MP3 file",
    b"OggS": "an Ogg media file", b"fLaC": "a FLAC audio file", b"Rar!": "a RAR archive",
    b"SQLite format 3": "a SQLite database", b"PAR1": "a Parquet file", b"BM": "a BMP image",
}
_MAX_UNZIPPED = 512 << 20  # a .docx that unpacks beyond this is a zip bomb, not a document
_ROWS_PER_SECTION = 100  # CSV/JSONL records grouped so no single section grows unbounded


class DocumentError(WorkbenchError):
    """A document that cannot be turned into text; `code` says which kind of problem."""

    status = 422
    code = "document_error"
    title = "Document cannot be parsed"


class UnsupportedFormat(DocumentError):
    status = 415
    code = "unsupported_format"
    title = "Unsupported document type"


class CorruptDocument(DocumentError):
    code = "corrupt_document"
    title = "Corrupt document"


class EmptyDocument(DocumentError):
    code = "empty_document"
    title = "Empty document"


@dataclass
class Section:
    """A run of text under one heading path, on one page (PDF) or None where pages are unknown."""

    text: str
    heading_path: list[str] = field(default_factory=list)
    page: int | None = None


@dataclass
class ParsedDocument:
    format: str
    title: str
    sections: list[Section]
    encoding: str | None = None  # of text formats: the encoding the bytes were decoded with
    warnings: list[str] = field(default_factory=list)  # what was repaired or skipped


# ---------------------------------------------------------------------------- detection


def detect_format(filename: str, data: bytes, content_type: str | None = None) -> str:
    """The format of `data` (one of FORMATS) from its content first, then its name and type.
    `data` may be the whole file or its first 64 kB: UnsupportedFormat (and CorruptDocument)
    only where those bytes prove it; other damage is left to parse()."""
    name = filename.replace("\\", "/")
    ext = PurePosixPath(name).suffix.lower()
    declared = _EXTENSIONS.get(ext) or _CONTENT_TYPES.get(_mime(content_type))
    head = data[:8192]
    if not data:
        raise EmptyDocument(f"{filename!r} is empty")
    if b"%PDF-" in data[:1024]:
        return "pdf"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_format(filename, data, declared)
    if declared == "pdf":
        raise CorruptDocument(f"{filename!r} is not a PDF: it has no %PDF header (the file is "
                              "damaged or has the wrong extension)")
    if declared == "docx":
        raise CorruptDocument(f"{filename!r} is not a .docx document: it is not a zip archive "
                              "(the file is damaged or has the wrong extension)")
    binary = b"\x00" in head and _utf16_without_bom(head) is None
    for magic, what in _BINARY_MAGIC.items():
        if head.startswith(magic):
            raise UnsupportedFormat(f"{filename!r} is {what}, not a supported document "
                                    f"({', '.join(FORMATS)})")
    for magic, what in _PRINTABLE_MAGIC.items():
        if head.startswith(magic) and (binary or _not_utf8(head)):
            raise UnsupportedFormat(f"{filename!r} is {what}, not a supported document "
                                    f"({', '.join(FORMATS)})")
    if head.startswith(b"{\\rtf"):
        raise UnsupportedFormat(f"{filename!r} is an RTF document; save it as .docx or PDF")
    if ext in _UNSUPPORTED_EXTENSIONS:
        raise UnsupportedFormat(f"files of type {ext} are not supported; supported: "
                                f"{', '.join(FORMATS)}")
    if binary:
        raise UnsupportedFormat(f"{filename!r} is binary data, not a supported document "
                                f"({', '.join(FORMATS)})")
    if declared is not None:
        return declared
    return _sniff_text(decode_text(head[:4096], final=False)[0])


def _mime(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _not_utf8(head: bytes) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)  # a sample: may end mid-character
        return False
    except UnicodeDecodeError:
        return True


def _zip_format(filename: str, data: bytes, declared: str | None) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, ValueError, OSError):
        # A head of the file, or a truncated one: the member names in its local headers tell.
        if b"word/" in data or declared == "docx":
            return "docx"  # parse() says whether it can be read
        names = {"xl/workbook.xml"} if b"xl/" in data else set()
        names |= {"ppt/presentation.xml"} if b"ppt/" in data else set()
    if "word/document.xml" in names:
        return "docx"
    if declared == "docx":
        raise CorruptDocument(f"{filename!r} is not a Word document: the archive holds no "
                              "word/document.xml")
    if "xl/workbook.xml" in names:
        raise UnsupportedFormat("Excel workbooks are not supported; export the sheet as CSV")
    if "ppt/presentation.xml" in names:
        raise UnsupportedFormat("PowerPoint files are not supported; export them as PDF")
    raise UnsupportedFormat("zip archives are not supported; upload the documents one by one")


def _sniff_text(text: str) -> str:
    start = text.lstrip()[:512].lower()
    if start.startswith(("<!doctype html", "<html")) or re.match(r"<(head|body|h[1-6]|p|div)\b",
                                                                 start):
        return "html"
    if start.startswith("{"):
        lines = [ln for ln in text.splitlines() if ln.strip()][:5]
        if len(lines) > 1:
            lines = lines[:-1]  # the sample may end mid-line
        try:
            if all(isinstance(json.loads(ln), dict) for ln in lines):
                return "jsonl"
        except ValueError:
            return "txt"  # a "{" that starts prose, or JSON pretty-printed over many lines
        return "json"
    if start.startswith("["):
        return "json"
    if re.search(r"(?m)^ {0,3}#{1,6}[ \t]+\S", text) or re.search(r"(?m)^```", text):
        return "md"
    return "txt"


# ---------------------------------------------------------------------------- text decoding

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
         (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


def _utf16_without_bom(head: bytes) -> str | None:
    """UTF-16 text (Windows' "Unicode" export) shows a NUL in every other byte."""
    sample = head[:4096]
    if len(sample) < 8:
        return None
    even, odd = sample[0::2], sample[1::2]
    if odd.count(0) > len(odd) * 0.4 and even.count(0) < len(even) * 0.05:
        return "utf-16-le"
    if even.count(0) > len(even) * 0.4 and odd.count(0) < len(odd) * 0.05:
        return "utf-16-be"
    return None


def _looks_gb(text: str) -> bool:
    """Real GBK/GB18030 Chinese is almost all GB2312 characters; Latin-1 bytes that happen to
    decode as GB18030 give rare extension characters instead."""
    chars = [ch for ch in text[:20000] if ord(ch) > 0x7F]
    common = len(chars) - len("".join(chars).encode("gb2312", "replace").split(b"?")) + 1
    return bool(chars) and common >= 0.8 * len(chars)


def decode_text(data: bytes, *, declared: str | None = None,
                final: bool = True) -> tuple[str, str, list[str]]:
    """(text, encoding, warnings): BOMs honoured, then UTF-8, a little damage repaired, then
    GB18030 (Chinese) and Windows-1252/Latin-1; CorruptDocument when nothing fits.
    `final=False` decodes a sample that may end mid-character."""
    warnings: list[str] = []
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                return codecs.decode(data[len(bom):], enc), enc, warnings
            except UnicodeDecodeError as exc:
                if not final:
                    return data[len(bom):].decode(enc, "ignore"), enc, warnings
                raise CorruptDocument(f"the text starts with a {enc} byte-order mark but is not "
                                      f"valid {enc} at byte {exc.start + len(bom)}") from None
    utf16 = _utf16_without_bom(data)
    if utf16 is not None:
        return data.decode(utf16, "replace"), utf16, warnings
    if declared:
        # As browsers do: pages labelled GB2312/GBK use GB18030 and Latin-1 means Windows-1252.
        declared = {"gb2312": "gb18030", "gbk": "gb18030", "iso-8859-1": "cp1252",
                    "latin1": "cp1252", "latin-1": "cp1252"}.get(declared.lower(), declared)
        try:
            return data.decode(declared), codecs.lookup(declared).name, warnings
        except (LookupError, UnicodeDecodeError):
            pass
    try:
        return data.decode("utf-8"), "utf-8", warnings
    except UnicodeDecodeError as exc:
        first_bad = exc.start
        if exc.reason == "unexpected end of data" and exc.start >= len(data) - 3:
            if final:
                warnings.append("the text ended in the middle of a UTF-8 character (file "
                                "truncated?); the partial character was dropped")
            return data[:exc.start].decode("utf-8"), "utf-8", warnings
    repaired = data.decode("utf-8", "replace")
    bad = repaired.count("\ufffd") - data.count(b"\xef\xbf\xbd")
    valid_multibyte = len(repaired) - len(repaired.encode("ascii", "ignore")) - bad
    if valid_multibyte >= 4 * bad:  # UTF-8 with some damage, not another encoding
        spots = len(re.findall("\ufffd+", repaired)) - data.count(b"\xef\xbf\xbd")
        if spots <= max(3, valid_multibyte // 50):
            warnings.append(f"{spots} damaged place(s) in the UTF-8 text replaced with \ufffd "
                            f"(the first at byte {first_bad})")
            return repaired, "utf-8", warnings
        raise CorruptDocument(f"the text is damaged UTF-8: {spots} places with invalid bytes, "
                              f"the first at byte {first_bad}; re-save the file as UTF-8")
    try:
        text = data.decode("gb18030")
        if _looks_gb(text):
            return text, "gb18030", warnings
    except UnicodeDecodeError:
        pass
    for enc in ("cp1252", "latin-1"):
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        if len(_CONTROLS.findall(text[:100000])) <= len(text[:100000]) // 100:
            return text, enc, warnings
    raise CorruptDocument(f"the text is not valid UTF-8 (first invalid byte at {first_bad}) and "
                          "no other encoding (GB18030, Latin-1) fits; re-save it as UTF-8")


def _clean(text: str) -> str:
    """Newlines unified, control characters gone, trailing spaces and blank-line runs trimmed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = _CONTROLS.sub("", unicodedata.normalize("NFC", text).replace("\ufeff", ""))
    text = re.sub(r"[ \t\u00a0]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------------------- entry point


def parse(filename: str, data: bytes, content_type: str | None = None, *,
          text_field: str | None = None) -> ParsedDocument:
    """Parse one uploaded document. `text_field` picks the text of JSON/JSONL records that have
    it (other records are flattened to "key: value" lines). Raises UnsupportedFormat,
    CorruptDocument or EmptyDocument with a message a user can act on."""
    fmt = detect_format(filename, data, content_type)
    stem = PurePosixPath(filename.replace("\\", "/")).stem or filename
    if fmt == "pdf":
        doc = _parse_pdf(data, stem)
    elif fmt == "docx":
        doc = _parse_docx(data, stem)
    else:
        declared = _html_charset(data) if fmt == "html" else None
        text, encoding, warnings = decode_text(data, declared=declared)
        readers: dict[str, Callable[[str, str], ParsedDocument]] = {
            "txt": _parse_txt, "md": _parse_markdown, "html": _parse_html,
            "csv": lambda t, s: _parse_csv(t, s, filename),
            "json": lambda t, s: _parse_json(t, s, text_field),
            "jsonl": lambda t, s: _parse_jsonl(t, s, text_field),
        }
        doc = readers[fmt](text, stem)
        doc.encoding, doc.warnings = encoding, warnings + doc.warnings
    doc.sections = [s for s in doc.sections if s.text]
    if not doc.sections:
        raise EmptyDocument(f"{filename!r} contains no text")
    doc.title = doc.title.strip() or stem
    return doc


def _sections(parts: Iterable[tuple[list[str], int | None, str]]) -> list[Section]:
    out: list[Section] = []
    for path, page, text in parts:
        text = _clean(text)
        if text:
            out.append(Section(text=text, heading_path=list(path), page=page))
    return out


# ---------------------------------------------------------------------------- txt and markdown


def _parse_txt(text: str, stem: str) -> ParsedDocument:
    if "\f" in text:  # form feeds separate pages (pdftotext and printers' output)
        pages = enumerate(text.split("\f"), start=1)
        return ParsedDocument("txt", stem, _sections(([], n, page) for n, page in pages))
    return ParsedDocument("txt", stem, _sections([([], None, text)]))


_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _parse_markdown(text: str, stem: str) -> ParsedDocument:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    title = ""
    if lines and lines[0].strip() == "---":  # YAML front matter: its title, not its text
        end = next((i for i in range(1, min(len(lines), 200)) if lines[i].strip() == "---"), 0)
        if end:
            for ln in lines[1:end]:
                if ln.lower().startswith("title:"):
                    title = ln.split(":", 1)[1].strip().strip("\"'")
            lines = lines[end + 1:]
    stack: list[tuple[int, str]] = []
    parts: list[tuple[list[str], int | None, str]] = []
    body: list[str] = []
    fence: str | None = None
    headings: list[str] = []

    def flush() -> None:
        parts.append(([h for _, h in stack], None, "\n".join(body)))
        body.clear()

    def open_heading(level: int, heading: str) -> None:
        nonlocal title
        flush()
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
        headings.append(heading)
        if level == 1 and not title:
            title = heading

    for line in lines:
        if fence is not None:
            body.append(line)
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            continue
        if m := _FENCE.match(line):
            fence = m.group(1)
            body.append(line)
            continue
        if m := _ATX.match(line):
            open_heading(len(m.group(1)), (m.group(2) or "").strip())
            continue
        if (m := _SETEXT.match(line)) and body and body[-1].strip():
            # The paragraph just above is the heading (CommonMark setext).
            start = len(body)
            while start > 0 and body[start - 1].strip():
                start -= 1
            heading = " ".join(ln.strip() for ln in body[start:])
            del body[start:]
            open_heading(1 if m.group(1)[0] == "=" else 2, heading)
            continue
        body.append(line)
    flush()
    sections = _sections(parts)
    if not sections and headings:  # a document of headings only still has text to find
        sections = [Section(text="\n".join(headings))]
    return ParsedDocument("md", title, sections)


# ---------------------------------------------------------------------------- html

_SKIP_TAGS = frozenset({"script", "style", "nav", "noscript", "template", "svg", "iframe",
                        "object", "head", "select", "button"})
_BLOCK_TAGS = frozenset({"p", "div", "section", "article", "main", "header", "footer", "aside",
                         "blockquote", "pre", "ul", "ol", "li", "dl", "dt", "dd", "table", "tr",
                         "form", "fieldset", "figure", "figcaption", "address", "hr", "br",
                         "caption", "details", "summary"})
_VOID_TAGS = frozenset({"br", "hr", "img", "input", "meta", "link", "area", "base", "col",
                        "embed", "source", "track", "wbr"})


def _html_charset(data: bytes) -> str | None:
    m = re.search(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_\-]+)""", data[:4096], re.IGNORECASE)
    return m.group(1).decode("ascii").lower() if m else None


class _HTMLText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.parts: list[tuple[list[str], int | None, str]] = []
        self._stack: list[tuple[int, str]] = []
        self._buf: list[str] = []
        self._skip: list[str] = []
        self._heading: tuple[int, list[str]] | None = None
        self._in_title = False
        self._pre = 0
        self._cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title" and self._skip in ([], ["head"]):
            self._in_title = True
        if tag == "body" and self._skip[:1] == ["head"]:
            self._skip.clear()  # a <head> never closed ends where the body starts
        if self._skip:
            if tag == self._skip[-1] or (tag in _SKIP_TAGS and tag not in _VOID_TAGS):
                self._skip.append(tag)
            return
        hidden = "hidden" in dict(attrs) or dict(attrs).get("aria-hidden") == "true"
        if tag in _SKIP_TAGS or (hidden and tag not in ("html", "body")):
            if tag not in _VOID_TAGS:
                self._skip.append(tag)
            return
        if len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._heading = (int(tag[1]), [])
        elif tag == "pre":
            self._pre += 1
            self._buf.append("\n\n")
        elif tag in ("td", "th"):
            self._buf.append(" | " if self._cell else "")
            self._cell = True
        elif tag == "tr":
            self._cell = False
            self._buf.append("\n")
        elif tag == "li":
            self._buf.append("\n- ")
        elif tag in _BLOCK_TAGS:
            self._buf.append("\n" if tag == "br" else "\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if self._skip:
            if tag in self._skip:
                while self._skip and self._skip.pop() != tag:
                    pass
            return
        if self._heading and len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            level, words = self._heading
            self._heading = None
            heading = " ".join("".join(words).split())
            if heading:
                self._flush()
                while self._stack and self._stack[-1][0] >= level:
                    self._stack.pop()
                self._stack.append((level, heading))
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
            self._buf.append("\n\n")
        elif tag in _BLOCK_TAGS and tag not in ("tr", "li", "br"):  # those break at their start
            self._buf.append("\n\n" if tag in ("p", "div", "table", "ul", "ol") else "\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._skip:
            return
        if self._heading is not None:
            self._heading[1].append(data)
        elif self._pre:
            self._buf.append(data)
        else:
            self._buf.append(re.sub(r"\s+", " ", data))

    def _flush(self) -> None:
        text = "".join(self._buf)
        # Collapsed whitespace leaves one leading space; more than one is <pre> indentation.
        text = "\n".join(ln[1:] if ln.startswith(" ") and not ln.startswith("  ") else ln
                         for ln in text.split("\n"))
        self.parts.append(([h for _, h in self._stack], None, text))
        self._buf.clear()

    def close(self) -> None:
        super().close()
        self._flush()


def _parse_html(text: str, stem: str) -> ParsedDocument:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    title = " ".join(parser.title.split())
    if not title:
        title = next((p[0][0] for p in parser.parts if p[0]), "")
    return ParsedDocument("html", title, _sections(parser.parts))


# ---------------------------------------------------------------------------- csv, json, jsonl


def _parse_csv(text: str, stem: str, filename: str) -> ParsedDocument:
    # The header line's most frequent delimiter; csv.Sniffer guesses wrong on quoted prose.
    first_line = text.lstrip("\ufeff").split("\n", 1)[0]
    counts = {d: first_line.count(d) for d in (",", "\t", ";", "|")}
    delimiter = max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","
    if filename.lower().endswith(".tsv") and counts["\t"]:
        delimiter = "\t"
    # Cells of whole articles are fine; the default 128 kB cap would call them corrupt.
    csv.field_size_limit(max(csv.field_size_limit(), 64 << 20))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader, [])]
        header = [h or f"column_{i + 1}" for i, h in enumerate(header)]
        parts: list[tuple[list[str], int | None, str]] = []
        rows: list[str] = []
        for row in reader:
            cells = [f"{header[i] if i < len(header) else f'column_{i + 1}'}: {v.strip()}"
                     for i, v in enumerate(row) if v.strip()]
            if cells:
                rows.append("; ".join(cells))
            if len(rows) >= _ROWS_PER_SECTION:
                parts.append(([], None, "\n\n".join(rows)))
                rows = []
        parts.append(([], None, "\n\n".join(rows)))
    except csv.Error as exc:
        raise CorruptDocument(f"the CSV file cannot be read at line {reader.line_num}: {exc}",
                              extra={"line": reader.line_num}) from None
    sections = _sections(parts)
    if not sections and header:
        raise EmptyDocument("the CSV file has a header but no rows")
    return ParsedDocument("csv", stem, sections)


def _flatten(value: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list):
        if all(not isinstance(v, dict | list) for v in value):
            joined = ", ".join(str(v) for v in value if v is not None and str(v).strip())
            if joined:
                yield f"{prefix}: {joined}" if prefix else joined
        else:
            for i, v in enumerate(value):
                yield from _flatten(v, f"{prefix}[{i}]")
    elif value is not None and str(value).strip():
        text = value if isinstance(value, str) else json.dumps(value)
        yield f"{prefix}: {text}" if prefix else text


def _record_text(obj: Any, text_field: str | None) -> str:
    if text_field and isinstance(obj, dict):
        value: Any = obj
        for key in text_field.split("."):  # "meta.body" reaches into nested objects
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str) and value.strip():
            return value
    return "\n".join(_flatten(obj))


def _records(records: Iterable[Any], text_field: str | None) -> list[Section]:
    parts: list[tuple[list[str], int | None, str]] = []
    batch: list[str] = []
    for obj in records:
        if text := _record_text(obj, text_field).strip():
            batch.append(text)
        if len(batch) >= _ROWS_PER_SECTION:
            parts.append(([], None, "\n\n".join(batch)))
            batch = []
    parts.append(([], None, "\n\n".join(batch)))
    return _sections(parts)


def _parse_jsonl(text: str, stem: str, text_field: str | None) -> ParsedDocument:
    def objects() -> Iterator[Any]:
        for number, line in enumerate(io.StringIO(text), start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise CorruptDocument(f"line {number} is not valid JSON: {exc}",
                                      extra={"line": number}) from None

    return ParsedDocument("jsonl", stem, _records(objects(), text_field))


def _parse_json(text: str, stem: str, text_field: str | None) -> ParsedDocument:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CorruptDocument(f"the file is not valid JSON: {exc}",
                              extra={"line": getattr(exc, "lineno", None)}) from None
    records = value if isinstance(value, list) else [value]
    return ParsedDocument("json", stem, _records(records, text_field))


# ---------------------------------------------------------------------------- pdf


def _parse_pdf(data: bytes, stem: str) -> ParsedDocument:
    from pypdf import PdfReader  # imported here: the other formats must not need it

    warnings: list[str] = []
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnsupportedFormat("the PDF is password-protected; upload an unprotected copy")
        pages = list(reader.pages)
    except DocumentError:
        raise
    except Exception as exc:
        raise CorruptDocument(f"the PDF cannot be read: {exc or type(exc).__name__} (the file "
                              "may be truncated or damaged)") from None
    if not pages:
        raise CorruptDocument("the PDF has no pages (the file may be truncated)")
    starts = _pdf_outline(reader, warnings)
    parts: list[tuple[list[str], int | None, str]] = []
    path: list[str] = []
    failed = 0
    for number, page in enumerate(pages, start=1):
        try:
            text = page.extract_text() or ""
        except Exception as exc:
            failed += 1
            warnings.append(f"page {number}: text could not be extracted ({exc})")
            continue
        text = re.sub(r"([a-z])-\n([a-z])", r"\1\2", text)  # words hyphenated at line ends
        cursor = 0
        for heading_path in starts.get(number, []):
            pattern = r"\s*".join(re.escape(w) for w in heading_path[-1].split())
            m = re.compile(pattern, re.IGNORECASE).search(text, cursor) if pattern else None
            if m:
                parts.append((path, number, text[cursor:m.start()]))
                cursor = m.end()
            path = heading_path
        parts.append((path, number, text[cursor:]))
    if failed == len(pages):
        raise CorruptDocument("no page of the PDF could be read (the file is damaged)")
    sections = _sections(parts)
    if not sections:
        raise EmptyDocument(f"the PDF has {len(pages)} page(s) but no text layer (scanned "
                            "images?); OCR is not supported")
    try:
        title = str(reader.metadata.title or "") if reader.metadata else ""
    except Exception:  # a damaged info dictionary is no reason to lose the text
        title = ""
    title = title or next((s.heading_path[0] for s in sections if s.heading_path), "")
    return ParsedDocument("pdf", title, sections, warnings=warnings)


def _pdf_outline(reader: Any, warnings: list[str]) -> dict[int, list[list[str]]]:
    """1-based page -> heading paths (bookmarks) that start on it, in outline order."""
    starts: dict[int, list[list[str]]] = {}

    def walk(items: list[Any], parents: list[str]) -> None:
        last: str | None = None
        for item in items:
            if isinstance(item, list):
                walk(item, [*parents, last] if last is not None else parents)
                continue
            last = " ".join(str(getattr(item, "title", "") or "").split())
            page = reader.get_destination_page_number(item)
            if last and page is not None and page >= 0:
                starts.setdefault(page + 1, []).append([*parents, last])

    try:
        walk(reader.outline, [])
    except Exception as exc:
        warnings.append(f"the PDF outline (bookmarks) could not be read: {exc}")
        return {}
    return starts


# ---------------------------------------------------------------------------- docx

_HEADING_STYLE = re.compile(r"^(?:heading|标题)\s*([1-9])$", re.IGNORECASE)


def _parse_docx(data: bytes, stem: str) -> ParsedDocument:
    import docx  # python-docx, imported here: the other formats must not need it
    from docx.table import Table

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            if sum(i.file_size for i in zf.infolist()) > _MAX_UNZIPPED:
                raise CorruptDocument(f"the .docx unpacks to more than {_MAX_UNZIPPED >> 20} MB; "
                                      "it is not a plausible document")
            bad = zf.testzip()
        if bad is not None:
            raise CorruptDocument(f"the .docx is damaged: its part {bad} fails its checksum")
        document = docx.Document(io.BytesIO(data))
        title = document.core_properties.title or ""
        parts, styled_title = _docx_parts(document.iter_inner_content(), Table)
    except DocumentError:
        raise
    except Exception as exc:
        raise CorruptDocument(f"the .docx cannot be read: {exc or type(exc).__name__} (the file "
                              "may be truncated or damaged)") from None
    title = title or styled_title or next((path[0] for path, _, _ in parts if path), "")
    return ParsedDocument("docx", title, _sections(parts))


def _docx_parts(blocks: Iterable[Any],
                table_type: type) -> tuple[list[tuple[list[str], int | None, str]], str]:
    """(body text grouped under heading paths, the text of the first Title-styled paragraph)."""
    stack: list[tuple[int, str]] = []
    parts: list[tuple[list[str], int | None, str]] = []
    body: list[str] = []
    title = ""
    for block in blocks:
        if isinstance(block, table_type):
            body.append(_docx_table(block))
            continue
        text = block.text.strip()
        level = _docx_heading_level(block)
        if level == 0:
            title = title or text
        elif level is not None and text:
            parts.append(([h for _, h in stack], None, "\n\n".join(body)))
            body = []
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, text))
        elif text:
            body.append(text)
    parts.append(([h for _, h in stack], None, "\n\n".join(body)))
    return parts, title


def _docx_heading_level(paragraph: Any) -> int | None:
    """1-9 for headings (by style name or outline level), 0 for the Title style, else None."""
    from docx.oxml.ns import qn

    style = paragraph.style
    name = (style.name or "") if style is not None else ""
    if name.lower() in ("title", "标题"):
        return 0
    if m := _HEADING_STYLE.match(name):
        return int(m.group(1))
    elements = [paragraph._p]
    while style is not None:  # outline level set on the paragraph or on a (base) style
        elements.append(style.element)
        style = style.base_style
    for element in elements:
        ppr = element.find(qn("w:pPr"))
        lvl = ppr.find(qn("w:outlineLvl")) if ppr is not None else None
        if lvl is not None:
            value = int(lvl.get(qn("w:val"), "9"))
            return value + 1 if value < 9 else None
    return None


def _docx_table(table: Any) -> str:
    rows: list[str] = []
    for row in table.rows:
        cells: list[str] = []
        seen: set[int] = set()
        for cell in row.cells:
            if id(cell._tc) in seen:  # a merged cell is reported once per grid column
                continue
            seen.add(id(cell._tc))
            cells.append(" ".join(cell.text.split()))
        if any(cells):
            rows.append(" | ".join(cells))
    return "\n".join(rows)
