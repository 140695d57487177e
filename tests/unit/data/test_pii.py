"""PII scanning and masking over a generated dataset with planted values at known rows."""

from __future__ import annotations

import datetime as dt
import random
import re
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pytest

from services.data.pii import (
    KINDS,
    STRATEGIES,
    ColumnFindings,
    MaskRule,
    Scanner,
    find_spans,
    is_name_column,
    is_valid_cn_resident_id,
    luhn_ok,
    mask_batch,
    mask_text,
    mask_value,
    rules_from_findings,
)

N_ROWS = 5000
BATCH_ROWS = 700  # not a divisor of N_ROWS: the last batch is short
SALT = b"salt-one"
AREAS = ("110105", "310101", "440305", "510104", "330106", "320102", "650102")
WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
FILLER = ("the", "order", "shipped", "on", "2024-01-05", "at", "10:30", "for", "$12.50",
          "version", "1.2.3", "订单", "已发货", "请", "联系", "客服", "thanks", "ok")


# ------------------------------------------------------------------------------ generators

def id_check(body: str) -> str:
    return "10X98765432"[sum(int(c) * w for c, w in zip(body, WEIGHTS, strict=True)) % 11]


def make_id(rng: random.Random) -> str:
    born = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(20000))
    body = f"{rng.choice(AREAS)}{born:%Y%m%d}{rng.randrange(1000):03d}"
    return body + id_check(body)


def bad_id(rng: random.Random) -> str:
    """18 chars that look like an ID but fail (checksum or date); never Luhn-valid either."""
    while True:
        good = make_id(rng)
        if rng.random() < 0.5:
            candidate = good[:17] + rng.choice([c for c in "0123456789X" if c != good[17]])
        else:  # month 13, with a correct checksum for that body
            body = good[:10] + "13" + good[12:17]
            candidate = body + id_check(body)
        if not is_valid_cn_resident_id(candidate) and not luhn_ok(candidate):
            return candidate


def luhn_digit(partial: str) -> str:
    for d in "0123456789":
        if luhn_ok(partial + d):
            return d
    raise AssertionError("unreachable")


def make_card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("62", 16), ("62", 19), ("5", 16), ("4", 13)])
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    return body + luhn_digit(body)


def group4(digits: str, sep: str) -> str:
    return sep.join(digits[i : i + 4] for i in range(0, len(digits), 4))


def make_mobile(rng: random.Random) -> str:
    return "1" + rng.choice("3456789") + "".join(rng.choice("0123456789") for _ in range(9))


def format_mobile(m: str, rng: random.Random) -> str:
    return rng.choice([m, f"+86 {m[:3]} {m[3:7]} {m[7:]}", f"{m[:3]}-{m[3:7]}-{m[7:]}",
                       f"0086 {m}", f"+86{m}", f"+86-{m}"])


def make_phone(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return format_mobile(make_mobile(rng), rng)
    return rng.choice(["+1 415 555 {:04d}", "+44 20 7946 {:04d}", "+49151123{:04d}"]).format(
        rng.randrange(10000))


def make_email(rng: random.Random, i: int) -> str:
    local = rng.choice(["john.doe", "li_wei", "a", "x+tag", "13800000000", "zhang.san"])
    domain = rng.choice(["example.com", "mail.example.org", "qq.com", "sub.example.co.uk"])
    return f"{local}{i}@{domain}"


def make_ip(rng: random.Random) -> str:
    if rng.random() < 0.75:
        return f"{rng.choice([10, 172, 192, 203])}.{rng.randrange(256)}.{rng.randrange(256)}." \
               f"{rng.randrange(1, 255)}"
    return rng.choice(["2001:db8::{:x}", "fe80::1:{:x}", "2001:db8:0:0:1:0:0:{:x}"]).format(
        rng.randrange(1, 0xFFFF))


def control_value(rng: random.Random) -> str:
    """Similar-looking but not personal data."""
    kind = rng.randrange(9)
    if kind == 0:  # order numbers of 12-20 digits that fail Luhn (and are no resident ID)
        while True:
            n = "".join(rng.choice("0123456789") for _ in range(rng.randint(12, 20)))
            if not luhn_ok(n) and not is_valid_cn_resident_id(n):
                return f"order {n}"
    if kind == 1:
        return rng.choice(["1.2.3.4.5", "v2.10.3", "version 10.4.1.20.7", "3.11.7"])
    if kind == 2:
        return f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} 12:30:45"
    if kind == 3:
        return f"¥{rng.randint(1, 99999)}.{rng.randint(0, 99):02d}"
    if kind == 4:  # 11 digits not starting with 1[3-9]
        head = rng.choice(["10", "12", "2", "9", "0"])
        return head + "".join(rng.choice("0123456789") for _ in range(11 - len(head)))
    if kind == 5:
        return rng.choice(["@home", "ping @team", "me@home", "std::vector", "a :: b"])
    if kind == 6:  # decimals and phone-like runs glued to letters
        return rng.choice([f"{make_mobile(rng)}.5", f"SN{make_mobile(rng)}",
                           f"{make_mobile(rng)}kg", f"1{make_mobile(rng)}"])
    if kind == 7:
        return f"{rng.randint(1, 999)}:{rng.randint(10, 59)}:{rng.randint(10, 59)}"
    return f"build 2024.01.05-{rng.randint(1000, 99999)}"


@dataclass
class Dataset:
    batch: pa.RecordBatch
    # (column, row) -> planted values in that cell, by kind
    planted: dict[tuple[str, int], dict[str, list[str]]] = field(default_factory=dict)

    def plant(self, column: str, row: int, kind: str, value: str) -> None:
        self.planted.setdefault((column, row), {}).setdefault(kind, []).append(value)

    def expected(self, column: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (col, _), kinds in self.planted.items():
            if col == column:
                for kind in kinds:
                    counts[kind] = counts.get(kind, 0) + 1
        return counts


def build_dataset(seed: int = 20240105) -> Dataset:
    rng = random.Random(seed)
    ds = Dataset(pa.record_batch({"x": [0]}))
    cols: dict[str, list[object]] = {k: [] for k in (
        "row_id", "notes", "id_number", "card", "customer_name", "username", "mobile",
        "control", "amount")}
    names = ["张伟", "王芳", "李娜", "John Smith", "Émilie Dubois", "欧阳娜娜", "O'Brien"]
    for i in range(N_ROWS):
        cols["row_id"].append(i)
        cols["amount"].append(None if i % 97 == 0 else round(rng.random() * 1000, 2))
        cols["username"].append(f"user_{i}" if i % 5 else None)
        cols["control"].append(None if i % 89 == 0 else control_value(rng))

        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 12))]
        for kind, every in (("email", 7), ("phone", 11), ("ip_address", 13)):
            if i % every == 3 and i % 50 != 1:
                value = make_email(rng, i) if kind == "email" else \
                    make_phone(rng) if kind == "phone" else make_ip(rng)
                words.insert(rng.randrange(len(words) + 1), rng.choice(
                    ["{}", "({})", "{},", "{}.", "联系{}号", "<{}>"]).format(value))
                ds.plant("notes", i, kind, value)
        cols["notes"].append(None if i % 50 == 1 else " ".join(words))

        if i % 50 == 2:
            cols["id_number"].append(None)
        elif i % 3 == 0:
            value = make_id(rng)
            value = value.lower() if i % 9 == 0 else value
            if i % 15 == 0:
                value = f"{value[:6]} {value[6:14]} {value[14:]}"
            cols["id_number"].append(value)
            ds.plant("id_number", i, "cn_resident_id", value)
        else:
            cols["id_number"].append(bad_id(rng))

        if i % 4 == 0:
            value = make_card(rng)
            value = group4(value, rng.choice([" ", "-"])) if i % 8 == 0 else value
            cols["card"].append(value)
            ds.plant("card", i, "bank_card", value)
        else:
            bad = make_card(rng)
            cols["card"].append(bad[:-1] + str((int(bad[-1]) + 1) % 10))

        if i % 40 == 5:
            cols["customer_name"].append(None)
        elif i % 40 == 6:
            cols["customer_name"].append(rng.choice(["", "   "]))
        else:
            value = rng.choice(names)
            cols["customer_name"].append(value)
            ds.plant("customer_name", i, "person_name", value)

        if i % 6 == 0:
            value = make_mobile(rng)
            cols["mobile"].append(int(value))
            ds.plant("mobile", i, "phone", value)
        else:
            cols["mobile"].append(None if i % 6 == 1 else rng.randrange(10**9))
    ds.batch = pa.RecordBatch.from_arrays(
        [pa.array(cols["row_id"], pa.int64()), pa.array(cols["notes"], pa.string()),
         pa.array(cols["id_number"], pa.string()), pa.array(cols["card"], pa.large_string()),
         pa.array(cols["customer_name"], pa.string()), pa.array(cols["username"], pa.string()),
         pa.array(cols["mobile"], pa.int64()), pa.array(cols["control"], pa.string()),
         pa.array(cols["amount"], pa.float64())],
        names=list(cols))
    return ds


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return build_dataset()


@pytest.fixture(scope="module")
def findings(ds: Dataset) -> list[ColumnFindings]:
    scanner = Scanner()
    for offset in range(0, N_ROWS, BATCH_ROWS):
        scanner.scan(ds.batch.slice(offset, BATCH_ROWS))
    assert scanner.rows_scanned == N_ROWS
    return scanner.report()


def planted_strings(ds: Dataset) -> list[tuple[str, int, str, str]]:
    return [(col, row, kind, v) for (col, row), kinds in ds.planted.items()
            for kind, values in kinds.items() for v in values]


def digit_windows(value: str, *, runs: bool = False) -> set[str]:
    """6-digit windows of the value's digits (ignoring separators), or of its digit runs."""
    parts = re.findall(r"\d{6,}", value) if runs else [re.sub(r"\D", "", value)]
    return {p[i : i + 6] for p in parts for i in range(len(p) - 5)}


HASH_TOKEN = re.compile(r"hash:[0-9a-f]{16}")


# ---------------------------------------------------------------------------- checksums

def test_resident_id_checksum() -> None:
    assert is_valid_cn_resident_id("11010519491231002X")
    assert is_valid_cn_resident_id("11010519491231002x")
    assert not is_valid_cn_resident_id("110105194912310021")
    assert not is_valid_cn_resident_id("11010519491231002")
    assert not is_valid_cn_resident_id("11010519491231002XX")
    assert not is_valid_cn_resident_id("1101051949123100AX")
    body_feb31 = "11010519490231002"
    assert not is_valid_cn_resident_id(body_feb31 + id_check(body_feb31))
    body_1899 = "11010518991231002"
    assert not is_valid_cn_resident_id(body_1899 + id_check(body_1899))
    future = f"110105{dt.date.today().year + 1}0101002"
    assert not is_valid_cn_resident_id(future + id_check(future))
    bad_area = "99010519491231002"
    assert not is_valid_cn_resident_id(bad_area + id_check(bad_area))
    rng = random.Random(1)
    assert all(is_valid_cn_resident_id(make_id(rng)) for _ in range(200))


def test_luhn() -> None:
    assert luhn_ok("4111111111111111")
    assert luhn_ok("79927398713")
    assert luhn_ok("6222021234567890128") is luhn_ok("6222021234567890128")
    assert not luhn_ok("4111111111111112")
    assert not luhn_ok("")
    assert not luhn_ok("4111-1111-1111-1111")
    assert not luhn_ok("٤١١١١١١١١١١١١١١١")  # non-ASCII digits


# ------------------------------------------------------------------------------ detection

def spans_of(text: str) -> list[tuple[str, str]]:
    return [(text[s:e], kind) for s, e, kind in find_spans(text)]


@pytest.mark.parametrize(("text", "expected"), [
    ("mail john.doe+x@example.com.", [("john.doe+x@example.com", "email")]),
    ("13812345678@qq.com", [("13812345678@qq.com", "email")]),
    ("call +86 138 1234 5678 now", [("+86 138 1234 5678", "phone")]),
    ("tel:139-8765-4321, 0086 13712345678", [("139-8765-4321", "phone"),
                                             ("0086 13712345678", "phone")]),
    ("电话13812345678号", [("13812345678", "phone")]),
    ("+1 415 555 0100", [("+1 415 555 0100", "phone")]),
    ("2024-01-05 13812345678 2024", [("13812345678", "phone")]),
    ("id 11010519491231002X ok", [("11010519491231002X", "cn_resident_id")]),
    ("110105 19491231 002x", [("110105 19491231 002x", "cn_resident_id")]),
    ("card 4111 1111 1111 1111 or 4111-1111-1111-1111",
     [("4111 1111 1111 1111", "bank_card"), ("4111-1111-1111-1111", "bank_card")]),
    ("ip 192.168.1.10:8080 and [2001:db8::1]", [("192.168.1.10", "ip_address"),
                                                ("2001:db8::1", "ip_address")]),
    ("mapped ::ffff:10.0.0.1", [("::ffff:10.0.0.1", "ip_address")]),
    ("addr:fe80::1%eth0", [("fe80::1", "ip_address")]),
    # boundaries: nothing glued to other digits or letters, no decimals, no versions or dates
    ("110105194912310021", []),  # invalid ID: no phone inside it either
    ("138123456789 013812345678 SN13812345678 13812345678kg 13812345678.5", []),
    ("1.2.3.4.5 v1.2.3.4 2024-01-05 2024.01.05 12:30:45 999.1.1.1", []),
    ("@home me@home std::vector a :: b 00:1A:2B:3C:4D:5E", []),
    ("4111111111111112 12345678901 1381234567", []),
])
def test_find_spans(text: str, expected: list[tuple[str, str]]) -> None:
    assert spans_of(text) == expected


def test_find_spans_is_linear_on_hostile_input() -> None:
    started = time.perf_counter()
    for text in ("1" * 200_000 + "a", "a" * 200_000 + "@", "1 " * 100_000, ":" * 200_000,
                 "a:" * 100_000, "1." * 100_000, "+1" * 100_000, "1-" * 100_000):
        find_spans(text)
    assert time.perf_counter() - started < 5


def test_name_labels() -> None:
    for label in ("name", "Full Name", "first_name", "LAST-NAME", "surname", "customerName",
                  "contact_name", "姓名", "客户姓名", "联系人", "名字"):
        assert is_name_column(label), label
    for label in ("username", "user_name", "filename", "company_name", "product name", "notes"):
        assert not is_name_column(label), label


# ------------------------------------------------------------------------------- scanning

def test_scanner_finds_every_planted_value(ds: Dataset, findings: list[ColumnFindings]) -> None:
    by_column = {f.column: f for f in findings}
    assert list(by_column) == ["notes", "id_number", "card", "customer_name", "mobile"]
    for column, found in by_column.items():
        assert found.kinds == ds.expected(column), column
        assert found.values_scanned == N_ROWS - ds.batch.column(column).null_count
        assert found.name_column is (column == "customer_name")
    assert ds.expected("notes").keys() == {"email", "phone", "ip_address"}
    # value by value: each planted cell yields exactly the planted spans
    for (column, row), kinds in ds.planted.items():
        cell = ds.batch.column(column)[row].as_py()
        if column == "customer_name":
            continue
        got: dict[str, list[str]] = {}
        for s, e, kind in find_spans(str(cell)):
            got.setdefault(kind, []).append(str(cell)[s:e])
        assert got == kinds, (column, row, cell)


def test_scanner_examples_are_masked(ds: Dataset, findings: list[ColumnFindings]) -> None:
    raw = {v for *_, v in planted_strings(ds)}
    for found in findings:
        assert found.examples.keys() == found.kinds.keys()
        for kind, examples in found.examples.items():
            assert 1 <= len(examples) <= 3
            for example in examples:
                assert example not in raw and "*" in example, (kind, example)
                assert not re.search(r"\d{6}", example)


def test_scanner_ignores_control_and_account_columns(findings: list[ColumnFindings]) -> None:
    columns = {f.column for f in findings}
    assert not columns & {"control", "username", "row_id", "amount"}


def test_scanner_accumulates_and_limits_examples() -> None:
    scanner = Scanner(max_examples=1)
    batch = pa.record_batch({"n": ["a@example.com", None], "q": [1, 2]})
    scanner.scan(batch)
    scanner.scan(pa.record_batch({"n": ["b@example.com x@y.io", "nothing"], "q": [3, 4]}))
    [found] = scanner.report()
    assert (found.column, found.kinds, found.values_scanned) == ("n", {"email": 2}, 3)
    assert found.examples == {"email": ["a***@example.com"]}
    assert scanner.rows_scanned == 4


# -------------------------------------------------------------------------------- masking

def masked(ds: Dataset, findings: list[ColumnFindings], strategy: str,
           salt: bytes = SALT) -> pa.RecordBatch:
    return mask_batch(ds.batch, rules_from_findings(findings, strategy), salt=salt)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_masking_leaves_no_planted_value(ds: Dataset, findings: list[ColumnFindings],
                                         strategy: str) -> None:
    out = masked(ds, findings, strategy)
    everything = "\n".join(str(v) for col in out.columns for v in col.to_pylist())
    for n, (column, row, kind, value) in enumerate(planted_strings(ds)):
        cell = out.column(column)[row].as_py()
        assert value not in cell, (strategy, column, cell)
        if kind != "person_name":
            assert n % 5 or value not in everything  # a sample: each search reads it all
            if len(re.sub(r"\D", "", value)) >= 6:
                visible = HASH_TOKEN.sub("", cell)
                assert not digit_windows(value) & digit_windows(visible, runs=True), cell
    rescanner = Scanner()
    rescanner.scan(out.drop_columns(["customer_name"]))
    assert rescanner.report() == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_masking_keeps_shape_nulls_and_other_columns(ds: Dataset, findings: list[ColumnFindings],
                                                     strategy: str) -> None:
    out = masked(ds, findings, strategy)
    assert out.num_rows == N_ROWS
    assert out.schema.names == ds.batch.schema.names
    for name in out.schema.names:
        before, after = ds.batch.column(name), out.column(name)
        expected_type = pa.string() if name == "mobile" else before.type
        assert after.type == expected_type, name
        assert after.is_null().to_pylist() == before.is_null().to_pylist(), name
        if name in ("row_id", "username", "control", "amount"):
            assert after.equals(before), name
    # cells without PII in masked columns are left alone
    for row in range(0, N_ROWS, 6):
        if ("id_number", row) not in ds.planted:
            assert out.column("id_number")[row] == ds.batch.column("id_number")[row]
    unplanted = [r for r in range(N_ROWS) if r % 6 not in (0, 1)]
    for row in unplanted[:50]:
        assert out.column("mobile")[row].as_py() == str(ds.batch.column("mobile")[row].as_py())


def test_redact_placeholders(ds: Dataset, findings: list[ColumnFindings]) -> None:
    out = masked(ds, findings, "redact")
    for (column, row), kinds in list(ds.planted.items())[:500]:
        cell = out.column(column)[row].as_py()
        for kind in kinds:
            assert f"[{kind.upper()}]" in cell
    assert mask_text("a@b.io 13812345678", "redact", salt=SALT) == "[EMAIL] [PHONE]"


def test_hash_is_deterministic_and_salted(ds: Dataset, findings: list[ColumnFindings]) -> None:
    one, again = masked(ds, findings, "hash"), masked(ds, findings, "hash")
    other = masked(ds, findings, "hash", salt=b"salt-two")
    assert one.equals(again)
    for column in ("notes", "id_number", "card", "customer_name", "mobile"):
        planted_rows = [r for (c, r) in ds.planted if c == column]
        a, b = one.column(column), other.column(column)
        assert all(a[r] != b[r] for r in planted_rows), column
    assert mask_value("张伟", "hash", salt=SALT) == mask_value("张伟", "hash", salt=SALT)
    token = mask_text("13812345678", "hash", salt=SALT)
    assert re.fullmatch(r"hash:[0-9a-f]{16}", token)
    # one number, written differently, in another column: still joins
    for written in ("+86 138 1234 5678", "138-1234-5678", "0086 13812345678"):
        assert mask_text(f"tel {written}", "hash", salt=SALT) == f"tel {token}"
    ints = mask_batch(pa.record_batch({"m": pa.array([13812345678], pa.int64())}),
                      [MaskRule("m", "hash")], salt=SALT)
    assert ints.column("m").to_pylist() == [token]


def test_partial_keeps_documented_parts() -> None:
    def partial(text: str) -> str:
        return mask_text(text, "partial", salt=SALT)

    assert partial("write to john.doe@example.com") == "write to j***@example.com"
    assert partial("13812345678") == "*******5678"
    assert partial("+86 138-1234-5678") == "+** ***-****-5678"
    assert partial("11010519491231002X") == "110*************2X"
    assert partial("4111 1111 1111 1111") == "**** **** **** 1111"
    assert partial("from 192.168.1.10") == "from 192.*.*.*"
    assert partial("from 2001:db8::1") == "from 2001:****"
    assert mask_value("张伟强", "partial", salt=SALT) == "张**"
    assert mask_value("John", "partial", salt=SALT) == "J***"
    assert mask_value("李", "partial", salt=SALT) == "*"
    assert mask_value("John", "redact", salt=SALT) == "[PERSON_NAME]"


def test_partial_on_dataset(ds: Dataset, findings: list[ColumnFindings]) -> None:
    out = masked(ds, findings, "partial")
    for column, row, kind, value in planted_strings(ds):
        cell = out.column(column)[row].as_py()
        if kind == "person_name":
            assert cell == value[0] + "*" * (len(value) - 1)
        elif column in ("card", "mobile"):
            assert cell.endswith(value[-4:]) and cell.count("*") == len(value) - 4 - \
                value.count(" ") - value.count("-")
        elif kind == "cn_resident_id":
            assert cell[:3] == value[:3] and cell[-2:] == value[-2:]
        elif kind == "email":
            assert f"{value[0]}***@{value.split('@')[1]}" in cell


def test_kinds_restrict_span_masking() -> None:
    text = "a@b.io 13812345678 10.0.0.1"
    assert mask_text(text, "redact", salt=SALT, kinds=["phone"]) == "a@b.io [PHONE] 10.0.0.1"
    batch = pa.record_batch({"t": [text, None], "u": ["x", "y"]})
    out = mask_batch(batch, [MaskRule("t", "redact", kinds=("email", "ip_address"))], salt=SALT)
    assert out.column("t").to_pylist() == ["[EMAIL] 13812345678 [IP_ADDRESS]", None]
    whole = mask_batch(batch, [MaskRule("t", "partial", whole_value=True)], salt=SALT)
    assert whole.column("t").to_pylist() == ["a" + "*" * (len(text) - 1), None]
    redacted = mask_batch(batch, [MaskRule("t", "redact", whole_value=True)], salt=SALT)
    assert redacted.column("t").to_pylist() == ["[REDACTED]", None]


def test_dictionary_columns_stay_dictionary_encoded() -> None:
    arr = pa.array(["a@b.io", None, "a@b.io", "none"]).dictionary_encode()
    batch = pa.record_batch({"d": arr})
    scanner = Scanner()
    scanner.scan(batch)
    assert scanner.report()[0].kinds == {"email": 2}
    out = mask_batch(batch, rules_from_findings(scanner.report(), "redact"), salt=SALT)
    assert out.column("d").type == arr.type
    assert out.column("d").to_pylist() == ["[EMAIL]", None, "[EMAIL]", "none"]


def test_rules_from_findings() -> None:
    findings = [ColumnFindings("姓名", {"person_name": 3}, 3, {}, True),
                ColumnFindings("notes", {"phone": 1, "email": 2}, 9, {}, False)]
    assert rules_from_findings(findings, "hash") == [
        MaskRule("姓名", "hash", whole_value=True),
        MaskRule("notes", "hash", kinds=("email", "phone")),
    ]
    assert set(KINDS) >= {"email", "phone", "person_name"}


def test_errors_are_value_errors() -> None:
    batch = pa.record_batch({"t": ["x"], "f": [1.5]})
    with pytest.raises(ValueError, match="strategy"):
        mask_text("x", "scramble", salt=SALT)
    with pytest.raises(ValueError, match="strategy"):
        mask_value("x", "scramble", salt=SALT)
    with pytest.raises(ValueError, match="strategy"):
        rules_from_findings([], "scramble")
    with pytest.raises(ValueError, match="strategy"):
        mask_batch(batch, [MaskRule("t", "scramble")], salt=SALT)
    with pytest.raises(ValueError, match="no column"):
        mask_batch(batch, [MaskRule("missing", "redact")], salt=SALT)
    with pytest.raises(ValueError, match="kinds"):
        mask_batch(batch, [MaskRule("t", "redact", kinds=("ssn",))], salt=SALT)
    with pytest.raises(ValueError, match="more than one"):
        mask_batch(batch, [MaskRule("t", "redact"), MaskRule("t", "hash")], salt=SALT)
    with pytest.raises(ValueError, match="type"):
        mask_batch(batch, [MaskRule("f", "redact", whole_value=True)], salt=SALT)
    with pytest.raises(ValueError, match="kinds"):
        mask_text("x", "redact", salt=SALT, kinds=["ssn"])
