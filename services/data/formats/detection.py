"""Format detection: a file's format from its first bytes, its filename and what was declared."""

from __future__ import annotations

import codecs
from pathlib import Path

import orjson

from services.data.formats.common import (
    _BINARY_MAGIC,
    _CHUNK,
    _CONTROL_BYTES,
    _EXTENSIONS,
    _NAMES,
    _SAMPLE,
    _TEXT_FORMATS,
    _WHITESPACE,
    FORMATS,
    FormatError,
    _require_format,
)


def _first_text(path: Path) -> tuple[bytes, bytes]:
    """(the file's first bytes, the text from its first non-whitespace byte after any BOM)."""
    with path.open("rb") as f:
        head = f.read(_SAMPLE)
        text = head.removeprefix(codecs.BOM_UTF8).lstrip(_WHITESPACE)
        while not text and (chunk := f.read(_CHUNK)):  # a file that starts with much whitespace
            text = chunk.lstrip(_WHITESPACE)[:_SAMPLE]
    return head, text


def _sniff(path: Path, ext_fmt: str | None) -> tuple[str, frozenset[str]]:
    """(best guess, formats the content is consistent with)."""
    head, text = _first_text(path)
    if head.startswith(b"PAR1"):
        return "parquet", frozenset({"parquet"})
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        if b"[Content_Types].xml" in head[30:80] or b"mimetypeapplication" in head[30:80]:
            raise FormatError("unsupported file type: an office document; export it as CSV",
                              code="unsupported_type")
        return "zip", frozenset({"zip"})
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FormatError("unsupported file type: UTF-16 text; save the file as UTF-8",
                          code="unsupported_type")
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    binary = b"\x00" in head or controls > len(head) // 10
    for magic, what in _BINARY_MAGIC.items():
        # A magic of printable characters could start a text file ("MZ,..." in a header).
        if head.startswith(magic) and (binary or not 0x20 <= magic[0] < 0x7F):
            raise FormatError(f"unsupported file type: {what}", code="unsupported_type")
    if binary:
        raise FormatError("unsupported file type: binary data that is none of "
                          f"{', '.join(FORMATS)}", code="unsupported_type")
    if not text:
        raise FormatError("the file is empty", code="empty_file")
    first_line, _, rest = text.partition(b"\n")
    if text.startswith(b"["):
        return "json", frozenset({"json", "txt"})
    if text.startswith(b"{"):
        try:
            is_object = isinstance(orjson.loads(first_line), dict)
        except orjson.JSONDecodeError:
            # A first line longer than the sample cannot be judged; otherwise an object that
            # spans lines is a pretty-printed JSON document.
            is_object = not rest and len(head) == _SAMPLE
        if not is_object:
            return "json", frozenset({"json", "jsonl", "txt"})
        many = rest.lstrip(_WHITESPACE).startswith(b"{")
        return "jsonl", frozenset({"jsonl", "txt"} if many else {"jsonl", "json", "txt"})
    tabs, commas = first_line.count(b"\t"), first_line.count(b",")
    guess = "tsv" if tabs > commas else "csv" if commas else "txt"
    # The header's delimiters decide when only one kind occurs; otherwise the extension does.
    if ext_fmt == "txt" or (ext_fmt in ("csv", "tsv") and (tabs > 0) == (commas > 0)):
        guess = ext_fmt
    return guess, frozenset({"csv", "tsv", "txt"})


def detect_format(path: Path, filename: str | None, declared: str | None = None) -> str:
    """The file's format from its content: `declared` wins when the content is consistent with
    it, then the filename's extension does. FormatError codes: empty_file, format_mismatch,
    unsupported_type (other binary content), unsupported_format (an unknown `declared`)."""
    if declared is not None:
        _require_format(declared)
    ext_fmt = _EXTENSIONS.get(Path(filename).suffix.lower()) if filename else None
    guess, consistent = _sniff(Path(path), ext_fmt)
    if declared is not None:
        if declared in consistent:
            return declared
        looks = "text" if guess in _TEXT_FORMATS else "binary"
        raise FormatError(f"the file was declared as {_NAMES[declared]}, but its content is "
                          f"{looks} that looks like {_NAMES[guess]}", code="format_mismatch")
    return ext_fmt if ext_fmt in consistent and guess not in ("csv", "tsv") else guess
