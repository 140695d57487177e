"""services.kb.parsing: every format to sections with headings and pages, and every error."""
# ruff: noqa: RUF001  (full-width CJK punctuation and typographic quotes are the data)

from __future__ import annotations

import io
import json
import random
import zipfile

import docx
import fpdf
import pytest

from services.kb.parsing import (
    CorruptDocument,
    EmptyDocument,
    ParsedDocument,
    UnsupportedFormat,
    decode_text,
    detect_format,
    parse,
)


def _texts(doc: ParsedDocument) -> str:
    return "\n".join(s.text for s in doc.sections)


def _pdf(pages: list[str], *, outline: list[tuple[int, int, str]] | None = None,
         title: str | None = None) -> bytes:
    """A real PDF (fpdf2): one text page per entry; outline entries (page, level, title) are
    written as a bookmarked heading line at the top of that page."""
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=11)
    if title:
        pdf.set_title(title)
    for number, text in enumerate(pages, start=1):
        pdf.add_page()
        for page, level, heading in outline or []:
            if page == number:
                pdf.start_section(heading, level=level)
                pdf.multi_cell(0, 8, heading, new_x="LMARGIN", new_y="NEXT")
        pdf.multi_cell(0, 6, text, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def _image_only_pdf() -> bytes:
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 30, 30)).save(png, format="PNG")
    pdf = fpdf.FPDF()
    pdf.add_page()
    pdf.image(io.BytesIO(png.getvalue()), x=10, y=10, w=100)
    return bytes(pdf.output())


def _docx() -> bytes:
    document = docx.Document()
    document.core_properties.title = "Operations manual"
    document.add_paragraph("Preface text before any heading.")
    document.add_heading("Installation", level=1)
    document.add_paragraph("Run the installer as administrator.")
    document.add_heading("Linux", level=2)
    document.add_paragraph("Use the tarball on Linux.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Port", "Service"
    table.cell(1, 0).text, table.cell(1, 1).text = "8080", "gateway"
    document.add_heading("Troubleshooting", level=1)
    document.add_paragraph("Check the logs first.")
    document.add_heading("日志", level=2)
    document.add_paragraph("日志位于 /var/log 目录。")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


# ---------------------------------------------------------------------------- text encodings


def test_utf8_bom_is_stripped() -> None:
    doc = parse("a.txt", "\ufeffhello wörld".encode())
    assert doc.format == "txt" and doc.encoding == "utf-8"
    assert doc.sections[0].text == "hello wörld"
    assert doc.sections[0].heading_path == [] and doc.sections[0].page is None


def test_gb18030_chinese_text_is_decoded() -> None:
    text = "知识库支持文档的导入、索引和检索。\n\n产品手册、标准作业程序和销售话术都可以导入。"
    doc = parse("手册.txt", text.encode("gb18030"))
    assert doc.encoding == "gb18030"
    assert _texts(doc) == text
    assert doc.title == "手册"


def test_latin1_text_is_not_mistaken_for_chinese() -> None:
    text = "Le café est très bon. Résumé naïve à la crème brûlée."
    doc = parse("fr.txt", text.encode("latin-1"))
    assert doc.encoding in ("cp1252", "latin-1")
    assert _texts(doc) == text


def test_windows_1252_smart_quotes() -> None:
    doc = parse("q.txt", "“Quoted” – dash…".encode("cp1252"))
    assert _texts(doc) == "“Quoted” – dash…"


def test_utf16_with_bom_is_decoded() -> None:
    doc = parse("u.txt", "\ufeffUnicode 文本 export".encode("utf-16-le"))
    assert _texts(doc) == "Unicode 文本 export"


def test_slightly_damaged_utf8_is_repaired_with_a_warning() -> None:
    good = ("这是一个很长的中文段落，用来测试修复。" * 20).encode()
    doc = parse("d.txt", good[:100] + b"\xff" + good[100:])
    assert doc.encoding == "utf-8"
    assert "\ufffd" in _texts(doc)
    assert doc.warnings and "damaged place" in doc.warnings[0]


def test_utf8_truncated_mid_character_drops_the_partial_character() -> None:
    doc = parse("t.txt", "完整的句子。".encode()[:-1])
    assert _texts(doc) == "完整的句子"
    assert doc.warnings


def test_badly_damaged_utf8_is_corrupt() -> None:
    good = ("混合编码的文本" * 10).encode()
    damaged = b"".join(good[i:i + 7] + b"\xff\xfe\x80" for i in range(0, len(good), 7))
    with pytest.raises(CorruptDocument, match="UTF-8") as info:
        decode_text(damaged + b"\x00\x01" * 10)
    assert info.value.code == "corrupt_document"


def test_form_feeds_in_text_are_page_breaks() -> None:
    doc = parse("p.txt", b"page one\fpage two\f\fpage four")
    assert [(s.text, s.page) for s in doc.sections] == [
        ("page one", 1), ("page two", 2), ("page four", 4)]


# ---------------------------------------------------------------------------- markdown, html


def test_markdown_atx_and_setext_headings_build_the_heading_path() -> None:
    md = ("Intro line.\n\n# Guide\n\nGuide text.\n\n## Setup ##\n\nSetup text.\n\n"
          "Details\n-------\n\nDetail text.\n\nAnother Top\n===========\n\nTop text.\n"
          "### Deep\nDeep text.\n")
    doc = parse("guide.md", md.encode())
    assert doc.format == "md" and doc.title == "Guide"
    got = [(s.heading_path, s.text) for s in doc.sections]
    assert got == [
        ([], "Intro line."),
        (["Guide"], "Guide text."),
        (["Guide", "Setup"], "Setup text."),
        (["Guide", "Details"], "Detail text."),
        (["Another Top"], "Top text."),
        (["Another Top", "Deep"], "Deep text."),
    ]


def test_markdown_code_fences_are_text_not_headings() -> None:
    md = "# API\n\nCall it:\n\n```bash\n# not a heading\ncurl x\n```\n\nAfter.\n"
    doc = parse("api.md", md.encode())
    assert len(doc.sections) == 1
    assert doc.sections[0].heading_path == ["API"]
    assert "```bash\n# not a heading\ncurl x\n```" in doc.sections[0].text
    assert doc.sections[0].text.endswith("After.")


def test_markdown_front_matter_gives_the_title() -> None:
    doc = parse("x.md", b"---\ntitle: \"Release notes\"\ndate: 2024\n---\nBody.\n")
    assert doc.title == "Release notes" and _texts(doc) == "Body."


def test_html_headings_and_boilerplate_removed() -> None:
    html = """<!DOCTYPE html><html><head><title>KB Page</title>
    <style>body { color: red }</style><script>var secret = 1;</script></head>
    <body><nav><a href="/">Home</a> | <a href="/x">Menu item</a></nav>
    <h1>Product</h1><p>The product &amp; its   features.</p>
    <h2>Pricing</h2><p>First line<br>second line</p>
    <table><tr><th>Plan</th><th>Price</th></tr><tr><td>Pro</td><td>10</td></tr></table>
    <h2>Support</h2><ul><li>Email</li><li>Phone</li></ul><div hidden>Hidden div</div>
    <span aria-hidden="true">Icon text</span>
    <script>console.log('x')</script></body></html>"""
    doc = parse("page.html", html.encode())
    assert doc.format == "html" and doc.title == "KB Page"
    text = _texts(doc)
    for gone in ("secret", "color", "Menu item", "Hidden div", "Icon text"):
        assert gone not in text
    got = {tuple(s.heading_path): s.text for s in doc.sections}
    assert got[("Product",)] == "The product & its features."
    assert "First line\nsecond line" in got[("Product", "Pricing")]
    assert "Plan | Price\nPro | 10" in got[("Product", "Pricing")]
    assert got[("Product", "Support")] == "- Email\n- Phone"


def test_html_meta_charset_gbk_is_honoured() -> None:
    html = '<html><head><meta charset="gbk"><title>标题</title></head><body><p>中文内容</p>'
    doc = parse("cn.html", html.encode("gbk"))
    assert doc.title == "标题" and _texts(doc) == "中文内容"


# ---------------------------------------------------------------------------- pdf


def test_pdf_pages_are_numbered_from_one_and_outline_gives_headings() -> None:
    data = _pdf(["Overview of the platform.", "More overview text.",
                 "Install with pip and run it."],
                outline=[(1, 0, "Overview"), (3, 0, "Installation")], title="Platform Guide")
    doc = parse("guide.pdf", data)
    assert doc.format == "pdf" and doc.title == "Platform Guide"
    got = [(s.page, s.heading_path, s.text) for s in doc.sections]
    assert got == [
        (1, ["Overview"], "Overview of the platform."),
        (2, ["Overview"], "More overview text."),
        (3, ["Installation"], "Install with pip and run it."),
    ]


def test_pdf_without_outline_has_pages_and_no_headings() -> None:
    doc = parse("plain.pdf", _pdf(["first page", "", "third page"]))
    assert [(s.page, s.heading_path, s.text) for s in doc.sections] == [
        (1, [], "first page"), (3, [], "third page")]
    assert doc.title == "plain"


def test_pdf_named_txt_is_parsed_as_pdf() -> None:
    doc = parse("report.txt", _pdf(["hidden pdf"]), content_type="text/plain")
    assert doc.format == "pdf" and _texts(doc) == "hidden pdf"


def test_text_named_pdf_is_corrupt() -> None:
    with pytest.raises(CorruptDocument, match="not a PDF"):
        parse("fake.pdf", b"just some text")


def test_truncated_pdf_is_corrupt() -> None:
    data = _pdf(["some text " * 50] * 3)
    with pytest.raises(CorruptDocument, match="PDF") as info:
        parse("cut.pdf", data[:len(data) // 3])
    assert info.value.status == 422


def test_pdf_of_only_images_is_empty() -> None:
    with pytest.raises(EmptyDocument, match="no text layer") as info:
        parse("scan.pdf", _image_only_pdf())
    assert info.value.code == "empty_document"


# ---------------------------------------------------------------------------- docx


def test_docx_heading_styles_and_tables() -> None:
    doc = parse("manual.docx", _docx())
    assert doc.format == "docx" and doc.title == "Operations manual"
    got = [(s.heading_path, s.text, s.page) for s in doc.sections]
    assert got == [
        ([], "Preface text before any heading.", None),
        (["Installation"], "Run the installer as administrator.", None),
        (["Installation", "Linux"], "Use the tarball on Linux.\n\nPort | Service\n8080 | gateway",
         None),
        (["Troubleshooting"], "Check the logs first.", None),
        (["Troubleshooting", "日志"], "日志位于 /var/log 目录。", None),
    ]


def test_docx_detected_by_content_whatever_the_name() -> None:
    assert detect_format("upload.bin.txt", _docx()) == "docx"


def test_truncated_docx_is_corrupt() -> None:
    data = _docx()
    with pytest.raises(CorruptDocument, match="docx"):
        parse("cut.docx", data[:len(data) // 2])
    with pytest.raises(CorruptDocument, match="docx"):
        parse("cut", data[:len(data) // 2])


def test_formats_are_detected_from_the_first_64_kb() -> None:
    document = docx.Document()
    rng = random.Random(0)
    for _ in range(3000):  # random hex: text that compresses badly, so the file is large
        document.add_paragraph(f"{rng.getrandbits(256):064x}")
    out = io.BytesIO()
    document.save(out)
    big = out.getvalue()
    assert len(big) > 64 << 10
    assert detect_format("big.docx", big[:64 << 10]) == "docx"
    assert detect_format("upload", big[:64 << 10]) == "docx"
    assert detect_format("x", _pdf(["page text"])[:1000]) == "pdf"
    text = ("知识库 " * 30000).encode("gb18030")
    assert detect_format("notes.txt", text[:(64 << 10) - 1]) == "txt"  # cut mid-character


def test_zip_named_docx_without_a_word_document_is_corrupt() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CorruptDocument, match=r"word/document\.xml"):
        parse("x.docx", out.getvalue())


def test_xlsx_and_plain_zip_are_unsupported() -> None:
    for member, expected in (("xl/workbook.xml", "Excel"), ("a.txt", "zip")):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr(member, "x")
        with pytest.raises(UnsupportedFormat, match=expected):
            parse("book", out.getvalue())


# ---------------------------------------------------------------------------- csv, json, jsonl


def test_csv_rows_become_column_value_lines() -> None:
    data = "name,city,notes\nAda,London,\"likes, commas\"\nLin,北京,\n".encode()
    doc = parse("people.csv", data)
    assert doc.format == "csv"
    assert _texts(doc) == ("name: Ada; city: London; notes: likes, commas\n\n"
                           "name: Lin; city: 北京")


def test_semicolon_and_tab_separated_files() -> None:
    assert _texts(parse("a.csv", b"a;b\n1;2\n")) == "a: 1; b: 2"
    assert _texts(parse("a.tsv", b"a\tb\n1\t2\n")) == "a: 1; b: 2"


def test_big_csv_is_split_into_bounded_sections() -> None:
    rows = "\n".join(f"{i},value {i}" for i in range(1050))
    doc = parse("big.csv", f"id,v\n{rows}\n".encode())
    assert len(doc.sections) == 11
    assert doc.sections[-1].text.endswith("id: 1049; v: value 1049")


def test_csv_cells_larger_than_the_csv_default_limit() -> None:
    article = "word " * 40_000  # 200 kB in one quoted cell
    doc = parse("long.csv", f'id,body\n1,"{article}"\n'.encode())
    assert _texts(doc) == f"id: 1; body: {article.strip()}"


def test_csv_with_only_a_header_is_empty() -> None:
    with pytest.raises(EmptyDocument, match="header but no rows"):
        parse("h.csv", b"a,b,c\n")


def test_jsonl_objects_are_flattened() -> None:
    lines = [{"q": "What is RAG?", "meta": {"lang": "en", "tags": ["kb", "llm"]}},
             {"q": "知识库是什么？", "n": 3, "none": None}]
    doc = parse("faq.jsonl", "\n".join(json.dumps(x, ensure_ascii=False) for x in lines).encode())
    assert doc.format == "jsonl"
    assert _texts(doc) == ("q: What is RAG?\nmeta.lang: en\nmeta.tags: kb, llm\n\n"
                           "q: 知识库是什么？\nn: 3")


def test_jsonl_text_field_picks_the_text() -> None:
    data = b'{"id": 1, "body": "first text"}\n\n{"id": 2, "other": "no body"}\n'
    doc = parse("d.jsonl", data, text_field="body")
    assert _texts(doc) == "first text\n\nid: 2\nother: no body"


def test_bad_jsonl_line_reports_its_line_number() -> None:
    with pytest.raises(CorruptDocument, match="line 3 is not valid JSON") as info:
        parse("bad.jsonl", b'{"a": 1}\n{"a": 2}\n{"a": \n')
    assert info.value.extra == {"line": 3}


def test_json_array_of_records() -> None:
    doc = parse("r.json", b'[{"title": "One"}, {"title": "Two"}]')
    assert doc.format == "json" and _texts(doc) == "title: One\n\ntitle: Two"


# ---------------------------------------------------------------------------- errors, detection


@pytest.mark.parametrize("data", [b"", b"   \n\t\n", b"\xef\xbb\xbf  \n"])
def test_empty_files_are_empty_documents(data: bytes) -> None:
    with pytest.raises(EmptyDocument) as info:
        parse("e.txt", data)
    assert info.value.code == "empty_document"


def test_html_of_only_scripts_and_navigation_is_empty_document() -> None:
    with pytest.raises(EmptyDocument):
        parse("e.html", b"<html><script>x()</script><nav><a>Home</a></nav><p> </p></html>")


def test_image_bytes_are_unsupported() -> None:
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    with pytest.raises(UnsupportedFormat, match="PNG image") as info:
        parse("photo.txt", png.getvalue())
    assert info.value.status == 415 and info.value.code == "unsupported_format"


def test_executables_are_unsupported() -> None:
    with pytest.raises(UnsupportedFormat, match="Windows executable"):
        parse("setup.exe", b"MZ\x90\x00\x03\x00\x00\x00" + b"\x00" * 100)
    with pytest.raises(UnsupportedFormat, match=r"\.exe"):
        parse("tool.exe", b"plain text in an exe")
    with pytest.raises(UnsupportedFormat, match="binary"):
        parse("blob", bytes(range(256)) * 4)


def test_text_that_starts_like_a_signature_is_still_text() -> None:
    assert _texts(parse("m.txt", b"MZ Corp annual report")) == "MZ Corp annual report"


def test_format_sniffed_from_content_without_an_extension() -> None:
    assert detect_format("upload", b"<!doctype html><p>x</p>") == "html"
    assert detect_format("upload", b'{"a": 1}\n{"a": 2}\n') == "jsonl"
    assert detect_format("upload", b"# Title\n\ntext") == "md"
    assert detect_format("upload", b"plain words") == "txt"
    assert detect_format("upload", b"x", "text/csv; charset=utf-8") == "csv"
