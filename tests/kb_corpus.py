"""A corpus of real documents for knowledge-base tests, written into a folder on demand: the
Python language reference's help topics (`pydoc_data`), standard-library module docstrings, tables
drawn from the standard library (HTTP statuses, errno codes, MIME types, exceptions, HTML
entities, codec aliases) and, where the system has them, Debian's common licenses — as txt, md,
html, pdf (fpdf2), docx (python-docx), csv and jsonl. It comes with questions whose answer sits in
one known document, each with a keyword found in that document only."""

from __future__ import annotations

import ast
import csv
import errno
import html
import http
import json
import mimetypes
import os
import re
import sysconfig
import unicodedata
from dataclasses import dataclass, field
from html.entities import codepoint2name
from pathlib import Path
from pydoc_data.topics import topics

LICENSES = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class Question:
    text: str
    document: str  # file name inside the corpus folder
    answer_keyword: str  # occurs (case-insensitively) in that document's text and no other


@dataclass
class Corpus:
    root: Path
    files: list[Path]
    questions: list[Question]
    texts: dict[str, str] = field(default_factory=dict)  # file name -> its plain text
    # file name -> (level, text) of each heading, for the formats that have headings
    headings: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.root / name


# ---------------------------------------------------------------------------------------------
# Structured text: a document is a title and blocks (heading / paragraph / code).


@dataclass(frozen=True)
class Block:
    kind: str  # "heading" | "paragraph" | "code"
    text: str
    level: int = 0  # headings: 1..3


@dataclass(frozen=True)
class Doc:
    name: str  # file name without extension
    title: str
    blocks: list[Block]


_UNDERLINES = {"*": 1, "=": 2, "-": 3}


def parse_help_text(text: str) -> list[Block]:
    """The reST-like plain text of pydoc topics and docstrings as blocks: a line underlined
    with * = or - is a heading, a chunk indented by 3+ spaces is code, the rest paragraphs."""
    blocks: list[Block] = []
    for chunk in re.split(r"\n\s*\n", text.strip("\n")):
        lines = chunk.split("\n")
        if (len(lines) >= 2 and lines[1] and set(lines[1]) <= set(_UNDERLINES)
                and len(set(lines[1])) == 1 and len(lines[1]) >= len(lines[0].strip()) > 0):
            blocks.append(Block("heading", lines[0].strip(), _UNDERLINES[lines[1][0]]))
            lines = lines[2:]
            if not lines:
                continue
        if all(line.startswith("   ") or not line.strip() for line in lines):
            indent = min(len(x) - len(x.lstrip()) for x in lines if x.strip())
            body = "\n".join(x[indent:] for x in lines)
            previous = blocks[-1] if blocks else None
            if previous is not None and previous.kind == "code":
                blocks[-1] = Block("code", previous.text + "\n\n" + body)
            else:
                blocks.append(Block("code", body))
        else:
            blocks.append(Block("paragraph", " ".join(x.strip() for x in lines)))
    return blocks


def topic_doc(topic: str, name: str | None = None) -> Doc:
    blocks = parse_help_text(topics[topic])
    title = blocks[0].text if blocks and blocks[0].kind == "heading" else topic
    return Doc(name or f"python-{topic}", title, blocks)


def module_doc(module: str) -> Doc:
    """A stdlib module's docstring and its public functions' and classes' docstrings, read with
    `ast` (nothing is imported)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    title = f"The {module} module"
    blocks = [Block("heading", title, 1), *parse_help_text(ast.get_docstring(tree) or "")]
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc.split()) < 8:
            continue
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        blocks.append(Block("heading", f"{module}.{node.name} ({kind})", 2))
        blocks.extend(parse_help_text(doc))
    return Doc(f"module-{module}", title, blocks)


def license_doc(name: str, folder: Path = LICENSES) -> Doc | None:
    path = folder / name
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return Doc(f"license-{name.lower()}", f"{name} license",
               [Block("heading", f"{name} license", 1),
                *(Block("paragraph", p) for p in paragraphs)])


def plain_text(doc: Doc) -> str:
    out = []
    for b in doc.blocks:
        if b.kind == "heading":
            out.append(f"{b.text}\n{'*=-'[min(b.level, 3) - 1] * len(b.text)}")
        elif b.kind == "code":
            out.append("\n".join("    " + line for line in b.text.split("\n")))
        else:
            out.append(b.text)
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Writers, one per format.


def write_txt(doc: Doc, folder: Path) -> tuple[Path, str]:
    text = plain_text(doc)
    path = folder / f"{doc.name}.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


def write_md(doc: Doc, folder: Path) -> tuple[Path, str]:
    out = []
    for b in doc.blocks:
        if b.kind == "heading":
            out.append(f"{'#' * b.level} {b.text}")
        elif b.kind == "code":
            out.append(f"```\n{b.text}\n```")
        else:
            out.append(b.text)
    text = "\n\n".join(out) + "\n"
    path = folder / f"{doc.name}.md"
    path.write_text(text, encoding="utf-8")
    return path, plain_text(doc)


def write_html(doc: Doc, folder: Path) -> tuple[Path, str]:
    body = []
    for b in doc.blocks:
        if b.kind == "heading":
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif b.kind == "code":
            body.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        else:
            body.append(f"<p>{html.escape(b.text)}</p>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(doc.title)}</title>\n"
            "<style>body{font-family:sans-serif;max-width:50em;margin:auto}</style>\n"
            "</head>\n<body>\n<nav><a href=\"index.html\">Python help topics</a></nav>\n"
            "<main>\n" + "\n".join(body) + "\n</main>\n"
            "<footer>Generated from the Python documentation.</footer>\n</body>\n</html>\n")
    path = folder / f"{doc.name}.html"
    path.write_text(page, encoding="utf-8")
    return path, plain_text(doc)


def write_docx(doc: Doc, folder: Path) -> tuple[Path, str]:
    import docx
    from docx.shared import Pt

    document = docx.Document()
    document.core_properties.title = doc.title
    for b in doc.blocks:
        if b.kind == "heading":
            document.add_heading(b.text, level=b.level)
        elif b.kind == "code":
            run = document.add_paragraph().add_run(b.text)
            run.font.name = "Courier New"
            run.font.size = Pt(9)
        else:
            document.add_paragraph(b.text)
    path = folder / f"{doc.name}.docx"
    document.save(str(path))
    return path, plain_text(doc)


_LATIN1 = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "\u2026": "...", "\u2013": "-", "\u2014": "--", "\u2022": "*",
                         "\u2192": "->", "\u2264": "<=", "\u2265": ">=", "\u00a0": " ",
                         "\u2028": " "})


def latin1(text: str) -> str:
    """What the PDF core fonts can show: typographic punctuation as ASCII, the rest as '?'."""
    return text.translate(_LATIN1).encode("latin-1", "replace").decode("latin-1")


def write_pdf(doc: Doc, folder: Path) -> tuple[Path, str]:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_title(latin1(doc.title))
    pdf.set_author("Python Software Foundation")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.set_margins(20, 20, 20)
    pdf.add_page()
    for b in doc.blocks:
        text = latin1(b.text)
        if b.kind == "heading":
            pdf.set_font("Helvetica", "B", {1: 16, 2: 13}.get(b.level, 11))
            pdf.multi_cell(0, 8, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1)
        elif b.kind == "code":
            pdf.set_font("Courier", "", 8)
            pdf.multi_cell(0, 4, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
        else:
            pdf.set_font("Helvetica", "", 10)
            pdf.multi_cell(0, 5, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
    path = folder / f"{doc.name}.pdf"
    pdf.output(str(path))
    return path, latin1(plain_text(doc))


WRITERS = {"txt": write_txt, "md": write_md, "html": write_html, "docx": write_docx,
           "pdf": write_pdf}


# ---------------------------------------------------------------------------------------------
# Tables from the standard library.


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> str:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path.read_text(encoding="utf-8")


def _write_jsonl(path: Path, records: list[dict[str, object]]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    return text


def http_status_csv(folder: Path) -> tuple[Path, str]:
    path = folder / "http-status-codes.csv"
    rows: list[list[object]] = [[s.value, s.name, s.phrase, s.description] for s in http.HTTPStatus]
    return path, _write_csv(path, ["code", "name", "phrase", "description"], rows)


def errno_csv(folder: Path) -> tuple[Path, str]:
    path = folder / "errno-codes.csv"
    rows: list[list[object]] = [[code, name, os.strerror(code)]
                                for code, name in sorted(errno.errorcode.items())]
    return path, _write_csv(path, ["number", "symbol", "message"], rows)


def mime_types_csv(folder: Path) -> tuple[Path, str]:
    path = folder / "mime-types.csv"
    # Only Python's own table: a MimeTypes() built without the system's mime.types files.
    table = mimetypes.MimeTypes(filenames=())
    rows: list[list[object]] = [[ext, kind, "standard"]
                                for ext, kind in sorted(table.types_map[True].items())]
    rows += [[ext, kind, "common (non-standard)"]
             for ext, kind in sorted(table.types_map[False].items())]
    return path, _write_csv(path, ["extension", "mime_type", "registry"], rows)


def exceptions_jsonl(folder: Path) -> tuple[Path, str]:
    import builtins

    records: list[dict[str, object]] = []
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            records.append({"exception": name, "base": obj.__bases__[0].__name__,
                            "description": " ".join((obj.__doc__ or "").split())})
    path = folder / "builtin-exceptions.jsonl"
    return path, _write_jsonl(path, records)


def html_entities_jsonl(folder: Path) -> tuple[Path, str]:
    records: list[dict[str, object]] = [
        {"entity": f"&{name};", "codepoint": f"U+{cp:04X}", "character": chr(cp),
         "unicode_name": unicodedata.name(chr(cp), "")}
        for cp, name in sorted(codepoint2name.items())]
    path = folder / "html-entities.jsonl"
    return path, _write_jsonl(path, records)


def codec_aliases_jsonl(folder: Path) -> tuple[Path, str]:
    from encodings.aliases import aliases

    records: list[dict[str, object]] = [{"alias": a, "codec": c}
                                        for a, c in sorted(aliases.items())]
    path = folder / "codec-aliases.jsonl"
    return path, _write_jsonl(path, records)


# ---------------------------------------------------------------------------------------------
# The corpus. Topics that contain another topic's text whole (compound ⊃ if/for/…,
# specialnames ⊃ customization/…) are left out so that every answer has exactly one home.

LAYOUT: dict[str, list[str]] = {
    # Multi-page PDFs of the longest topics.
    "pdf": ["types", "formatstrings", "string-methods", "typesseq", "debugger",
            "attribute-access"],
    # Structured formats get the texts that have sections (two or more headings).
    "docx": ["assignment", "comparisons", "execmodel", "import", "try", "module:statistics"],
    "html": ["identifiers", "typesmapping", "module:argparse", "module:difflib",
             "module:configparser", "module:textwrap", "module:bisect"],
    "md": ["async", "module:heapq", "module:shelve", "module:timeit", "module:fileinput",
           "module:uuid", "module:tempfile", "module:socketserver"],
    "txt": ["raise", "binary", "with", "class", "subscriptions", "dict", "calls", "function",
            "sequence-types", "objects", "numeric-types", "operator-summary", "for", "while",
            "slicings", "booleans", "global", "power", "lambda", "del", "assert", "nonlocal",
            "module:sched", "module:copy", "module:cmd"],
}
LICENSE_NAMES = ["Apache-2.0", "MPL-2.0", "GPL-3", "BSD", "Artistic", "CC0-1.0"]
TABLES = [http_status_csv, errno_csv, mime_types_csv, exceptions_jsonl, html_entities_jsonl,
          codec_aliases_jsonl]

QUESTIONS = [
    # pdf
    Question("In pdb, how do I set a breakpoint that goes away on its own once it has been hit?",
             "python-debugger.pdf", "tbreak"),
    Question("When formatting floats, how can I avoid getting -0.0 with a minus sign after "
             "rounding?", "python-formatstrings.pdf", "negative zero"),
    Question("What is the right way to cut an exact prefix off a string, given that lstrip "
             "removes a set of characters instead?", "python-string-methods.pdf",
             "removeprefix"),
    Question("Which attribute of a code object tells how many positional arguments the function "
             "takes?", "python-types.pdf", "co_argcount"),
    Question("How can I stop instances of my class from getting a per-instance __dict__ to save "
             "memory?", "python-attribute-access.pdf", "__slots__"),
    # docx
    Question("Can I write a < b < c in Python, and is the middle value evaluated twice?",
             "python-comparisons.docx", "can be chained arbitrarily"),
    Question("Which statistics function should I use to average rates such as speeds?",
             "module-statistics.docx", "harmonic_mean"),
    Question("What happens to a pending exception when the finally block raises a new one?",
             "python-try.docx", "saved exception"),
    # html
    Question("How do I declare which command-line options and positional arguments my script "
             "accepts?", "module-argparse.html", "add_argument"),
    Question("How can I suggest the most similar known words when a user misspells one?",
             "module-difflib.html", "get_close_matches"),
    Question("How do I strip the common indentation from a triple-quoted string in my code?",
             "module-textwrap.html", "dedent"),
    # md
    Question("What method must an object provide so that it can be used in an async for loop?",
             "python-async.md", "__aiter__"),
    Question("Is there a faster way to push a new item onto a heap and pop the smallest one in "
             "a single step?", "module-heapq.md", "heappushpop"),
    Question("Why are my appends to a list stored in a shelf lost, and how do I make them "
             "stick?", "module-shelve.md", "writeback=True"),
    Question("How can I make a socketserver handle each request in its own child process?",
             "module-socketserver.md", "ForkingMixIn"),
    # txt
    Question("Which special method do I define so that my class supports the @ matrix "
             "multiplication operator?", "python-numeric-types.txt", "__matmul__"),
    Question("How do I raise a new exception inside an except block without showing the "
             "original one as its context?", "python-raise.txt", "from None"),
    # csv, jsonl
    Question("What is the HTTP response code of the joke status about a teapot that will not "
             "make coffee?", "http-status-codes.csv", "IM_A_TEAPOT"),
    Question("Which errno name does the operating system report when the disk is full?",
             "errno-codes.csv", "ENOSPC"),
    Question("What named HTML entity can I use to write the euro currency sign?",
             "html-entities.jsonl", "&euro;"),
]


def _source(item: str) -> Doc:
    if item.startswith("module:"):
        return module_doc(item.removeprefix("module:"))
    return topic_doc(item)


def normalize(text: str) -> str:
    """Lower case, typographic quotes as ASCII, whitespace collapsed: how keywords are
    compared with document text."""
    return " ".join(latin1(text).lower().split())


def documents_containing(keyword: str, texts: dict[str, str]) -> list[str]:
    needle = normalize(keyword)
    return [name for name, text in texts.items() if needle in normalize(text)]


def build_corpus(folder: Path, *, questions: list[Question] | None = None,
                 licenses: Path = LICENSES) -> Corpus:
    """Write the corpus into `folder` and return its files, texts and questions; raises
    AssertionError when a question's keyword is not found in exactly its own document.
    54 documents come from Python itself; Debian's licenses (when `licenses` has them) add 6."""
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    texts: dict[str, str] = {}
    headings: dict[str, list[tuple[int, str]]] = {}

    def add(path: Path, text: str) -> None:
        assert path.name not in texts, f"two documents are named {path.name}"
        files.append(path)
        texts[path.name] = text

    for fmt, items in LAYOUT.items():
        for item in items:
            doc = _source(item)
            path, text = WRITERS[fmt](doc, folder)
            add(path, text)
            headings[path.name] = [(b.level, b.text) for b in doc.blocks if b.kind == "heading"]
    for name in LICENSE_NAMES:
        lic = license_doc(name, licenses)
        if lic is not None:  # Debian systems have them; elsewhere the corpus goes without
            add(*write_txt(lic, folder))
    for table in TABLES:
        add(*table(folder))

    chosen = QUESTIONS if questions is None else questions
    for q in chosen:
        where = documents_containing(q.answer_keyword, texts)
        assert where == [q.document], (
            f"keyword {q.answer_keyword!r} of question {q.text!r} is in {where}, "
            f"expected only in {q.document}")
    return Corpus(folder, files, list(chosen), texts, headings)
