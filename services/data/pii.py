"""PII detection and masking for dataset versions: pure functions over pyarrow RecordBatches,
meant to run in a worker thread while a version is streamed batch by batch."""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

KINDS = ("email", "phone", "cn_resident_id", "bank_card", "ip_address", "person_name")
SPAN_KINDS = KINDS[:5]
STRATEGIES = ("redact", "partial", "hash")

# ---------------------------------------------------------------------------------- checksums

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
# First two digits of a resident ID: the province-level division (71 Taiwan, 81/82 HK/Macau,
# 83 residence permits for Taiwan residents).
_ID_PROVINCES = frozenset(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 "
    "61 62 63 64 65 71 81 82 83".split()
)


def is_valid_cn_resident_id(value: str) -> bool:
    """18 chars: province/area code, real birth date (1900..today), sequence, MOD 11-2 check."""
    if not isinstance(value, str) or len(value) != 18 or not value[:17].isascii():
        return False
    body, check = value[:17], value[17].upper()
    if not body.isdigit() or body[:2] not in _ID_PROVINCES or check not in _ID_CHECK:
        return False
    year, month, day = int(body[6:10]), int(body[10:12]), int(body[12:14])
    try:
        birth = _dt.date(year, month, day)
    except ValueError:
        return False
    if year < 1900 or birth > _dt.date.today():
        return False
    total = sum((ord(c) - 48) * w for c, w in zip(body, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == check


def luhn_ok(digits: str) -> bool:
    """Luhn (mod 10) check of a string of ASCII digits; False for anything else."""
    if not digits or not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# ---------------------------------------------------------------------------------- detection

# One pass per family, each cheap to skip: e-mail only runs on text with an '@', IPv6 on text
# with '::' or 7 colons, and the digit patterns start with a character class so the regex
# engine jumps from digit to digit.  Look-behinds make a token start only where it is not glued
# to a letter/digit (keeps every pass linear); digit runs are possessive so a run that ends in
# a letter fails at once.  Number tokens are classified in Python (`_number_spans`).
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}+@"
    r"(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![A-Za-z0-9-])",
    re.ASCII,
)
_IPV4 = re.compile(
    r"\d(?<![0-9A-Za-z]\d)(?<!\d\.\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?![0-9A-Za-z]|\.\d)",
    re.ASCII,
)
_IPV6 = re.compile(
    r"[0-9A-Fa-f:](?<![0-9A-Za-z].)(?<![0-9A-Fa-f:]:.)(?:(?<=:)|(?<=[0-9A-Fa-f])[0-9A-Fa-f]{0,3}:)"
    r"(?:[0-9A-Fa-f]{0,4}:){1,6}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![0-9A-Za-z:]|\.\d)",
    re.ASCII,
)
_NUMBER = re.compile(
    r"[+\d](?<![0-9A-Za-z].)(?<!\d\.\d)(?:(?<=\+)\d(?=(?:[ -]?\d){7})|(?<=\d)(?=(?:[ -]?\d){10}))"
    r"\d*+(?:[ -]\d++)*+[Xx]?",
    re.ASCII,
)
_GLUED = re.compile(r"[0-9A-Za-z]|[.:]\d", re.ASCII)  # after a number: it goes on
_IPV6_FULL = re.compile(r":[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:", re.ASCII)
_GROUP = re.compile(r"\d+[Xx]?", re.ASCII)
_HEX = re.compile(r"[0-9A-Fa-f]", re.ASCII)
_HINT = re.compile(r"[0-9@:]")
_CN_MOBILE = re.compile(r"1[3-9]\d{9}", re.ASCII)
_CN_SHAPES = frozenset({(11,), (3, 4, 4), (3, 8)})
_CARD_SHAPES = frozenset({(4, 6, 5), (4, 6, 4)})
_CARD_FIRST = frozenset("234569")  # major industry identifiers used by payment cards
_MAX_TOKEN_DIGITS = 23  # 0086 + 19


def _classify(digits: str, shape: tuple[int, ...], plus: bool) -> str | None:
    """Kind of a number written as `digits` in groups of `shape` (None: not PII)."""
    n = len(digits)
    if not plus and n == 18 and shape in ((18,), (6, 8, 4)) and is_valid_cn_resident_id(digits):
        return "cn_resident_id"
    if not digits[-1].isdigit():
        return None
    if (
        not plus
        and 13 <= n <= 19
        and digits[0] in _CARD_FIRST
        and (
            len(shape) == 1
            or shape in _CARD_SHAPES
            or (len(shape) >= 4 and max(shape[:-1]) == min(shape[:-1]) == 4 and shape[-1] <= 4)
        )
        and luhn_ok(digits)
    ):
        return "bank_card"
    prefix = 2 if plus and digits.startswith("86") else 4 if digits.startswith("0086") else 0
    rest = digits[prefix:]
    if len(rest) == 11 and _CN_MOBILE.fullmatch(rest):
        if prefix or (not plus and shape in _CN_SHAPES):
            return "phone"
    if plus and 8 <= n <= 15 and digits[0] != "0":
        return "phone"
    return None


def _number_spans(text: str, start: int, end: int, out: list[tuple[int, int, str]]) -> None:
    """Split a run of digit groups (separated by one space or dash) into the longest PII
    numbers, left to right.  A dash binds tighter than a space: "2024-01-05" is never split."""
    plus = text[start] == "+"
    glued = _GLUED.match(text, end) is not None  # "…5678kg", "…5678.5", "…12:30"
    token = text[start:end]
    seps = token.count(" ") + token.count("-")
    if not seps:
        if not glued and (kind := _classify(token[1:] if plus else token,
                                            (end - start - plus,), plus)):
            out.append((start, end, kind))
        return
    if len(token) - seps - plus < (8 if plus else 11):
        return
    groups = [(m.start(), m.end()) for m in _GROUP.finditer(text, start, end)]
    sizes = [e - s for s, e in groups]
    last = len(groups) - 1
    i = 0
    while i <= last:
        if i and text[groups[i][0] - 1] != " ":
            i += 1
            continue
        with_plus = plus and i == 0
        j, total = i, sizes[i]
        # only these can lead a multi-group number: CN mobile, 0086, card, resident ID
        if with_plus or sizes[i] in (3, 4, 6):
            while j < last and total + sizes[j + 1] <= _MAX_TOKEN_DIGITS:
                j += 1
                total += sizes[j]
        for k in range(j, i - 1, -1):
            ends_ok = text[groups[k][1]] == " " if k < last else not glued
            if ends_ok and total >= (8 if with_plus else 11):
                digits = "".join(text[s:e] for s, e in groups[i : k + 1])
                if kind := _classify(digits, tuple(sizes[i : k + 1]), with_plus):
                    out.append((start if with_plus else groups[i][0], groups[k][1], kind))
                    i = k
                    break
            total -= sizes[k]
        i += 1


def _is_ip(candidate: str) -> bool:
    if not _HEX.search(candidate):  # '::' alone is no address
        return False
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _ip_spans(pattern: re.Pattern[str], text: str, out: list[tuple[int, int, str]]) -> None:
    pos = 0
    while (m := pattern.search(text, pos)) is not None:
        if _is_ip(m.group()):
            out.append((m.start(), m.end(), "ip_address"))
            pos = m.end()
        else:
            pos = m.start() + 1  # not an address: a shorter one may start inside


Span = tuple[int, int, str]


def _without_overlaps(spans: list[Span], taken: list[Span]) -> list[Span]:
    """`spans` (in order) minus those that overlap `taken` (in order, disjoint)."""
    kept, p = [], 0
    for span in spans:
        while p < len(taken) and taken[p][1] <= span[0]:
            p += 1
        if p == len(taken) or span[1] <= taken[p][0]:
            kept.append(span)
    return kept


def find_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every PII value in `text`: non-overlapping, in order.
    Precedence on overlap: e-mail, IPv6, IPv4, then numbers."""
    if _HINT.search(text) is None:
        return []
    taken: list[Span] = []
    if "@" in text:
        taken = [(m.start(), m.end(), "email") for m in _EMAIL.finditer(text)]
    for gate, pattern in (
        ("::" in text or (text.count(":") >= 7 and _IPV6_FULL.search(text)), _IPV6),
        (text.count(".") >= 3, _IPV4),
    ):
        if gate:
            ips: list[Span] = []
            _ip_spans(pattern, text, ips)
            if ips:
                taken = sorted(taken + _without_overlaps(ips, taken))
    numbers: list[Span] = []
    for m in _NUMBER.finditer(text):
        _number_spans(text, m.start(), m.end(), numbers)
    if taken:
        numbers = sorted(taken + _without_overlaps(numbers, taken))
    return numbers


def _int_kind(value: int) -> str | None:
    digits = str(abs(value))
    return _classify(digits, (len(digits),), False)


# ---------------------------------------------------------------------------- name columns

_NAME_LABELS = frozenset(
    "name fullname firstname lastname surname givenname familyname middlename customername "
    "contactname clientname personname realname patientname employeename holdername "
    "cardholdername accountholdername recipientname sendername studentname "
    "姓名 名字 联系人 收货人 收件人 寄件人 持卡人 姓 真实姓名".split()
)
_NAME_SUFFIXES = ("fullname", "firstname", "lastname", "surname", "givenname", "familyname",
                  "realname", "姓名")
_LABEL_SEPARATORS = re.compile(r"[\s_\-.]+")


def is_name_column(label: str) -> bool:
    """Does the column label say it holds people's names? ("username" is an account id.)"""
    norm = _LABEL_SEPARATORS.sub("", label).casefold()
    return norm in _NAME_LABELS or norm.endswith(_NAME_SUFFIXES)


# ------------------------------------------------------------------------------- masking

_PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in KINDS}
_LONG_DIGITS = re.compile(r"\d{6,}")


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown masking strategy {strategy!r}; expected one of {STRATEGIES}")


def _hash(value: str, salt: bytes) -> str:
    return "hash:" + hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()[:16]


def _keep(span: str, head: int, tail: int) -> str:
    """Star every digit (and ID check char) except the first `head` and the last `tail`."""
    total = sum(c.isdigit() or c in "Xx" for c in span)
    out, seen = [], 0
    for c in span:
        if c.isdigit() or c in "Xx":
            out.append(c if seen < head or seen >= total - tail else "*")
            seen += 1
        else:
            out.append(c)
    return "".join(out)


def _canonical(span: str, kind: str) -> str:
    """Form hashed for a span, so that differently written copies of a value still join."""
    if kind == "email":
        return span.lower()
    if kind == "ip_address":
        return str(ipaddress.ip_address(span))
    digits = "".join(c for c in span if c.isdigit() or c in "Xx").upper()
    if kind == "phone" and digits.startswith(("86", "0086")) and _CN_MOBILE.fullmatch(digits[-11:]):
        return digits[-11:]  # +86 / 0086 prefixed or not: the same mobile number
    return digits


def _mask_span(span: str, kind: str, strategy: str, salt: bytes) -> str:
    if strategy == "redact":
        return _PLACEHOLDERS[kind]
    if strategy == "hash":
        return _hash(_canonical(span, kind), salt)
    if kind == "email":
        local, _, domain = span.rpartition("@")
        return local[0] + "***@" + _LONG_DIGITS.sub(lambda m: "*" * len(m.group()), domain)
    if kind == "ip_address":
        addr = ipaddress.ip_address(span)
        if addr.version == 4:
            return span.split(".")[0] + ".*.*.*"
        return addr.exploded.split(":")[0].lstrip("0").rjust(1, "0") + ":****"
    if kind == "cn_resident_id":
        return _keep(span, 3, 2)
    return _keep(span, 0, 4)  # phone, bank card


def mask_text(
    text: str, strategy: str, *, salt: bytes, kinds: Collection[str] | None = None
) -> str:
    """Mask every detected span of `kinds` (default: all) inside `text`.

    redact -> "[EMAIL]", "[PHONE]", ...; partial -> e.g. "a***@example.com", "*******5678",
    "**** **** **** 1111", "110*************2X", "192.*.*.*"; hash -> "hash:" + 16 hex chars of
    HMAC-SHA256(salt, canonical value) (digits only / lower-cased e-mail), so joins still work.
    """
    _check_strategy(strategy)
    if kinds is not None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; expected some of {KINDS}")
    parts: list[str] = []
    pos = 0
    for s, e, kind in find_spans(text):
        if kinds is None or kind in kinds:
            parts += (text[pos:s], _mask_span(text[s:e], kind, strategy, salt))
            pos = e
    if not parts:
        return text
    parts.append(text[pos:])
    return "".join(parts)


def mask_value(
    value: str, strategy: str, *, salt: bytes, placeholder: str = "[PERSON_NAME]"
) -> str:
    """Mask a whole cell: redact -> placeholder; partial -> first char + '*'s ("张**", "J***");
    hash -> as in `mask_text` (of the value as is)."""
    _check_strategy(strategy)
    if strategy == "redact":
        return placeholder
    if strategy == "hash":
        return _hash(value, salt)
    if len(value) <= 1:
        return "*" * len(value)
    return value[0] + "*" * (len(value) - 1)


# -------------------------------------------------------------------------------- scanning


def _is_text(t: Any) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def _is_dict_text(t: Any) -> bool:
    return bool(pa.types.is_dictionary(t) and _is_text(t.value_type))


@dataclass
class ColumnFindings:
    column: str
    kinds: dict[str, int] = field(default_factory=dict)  # kind -> cells where it was found
    values_scanned: int = 0  # non-null values looked at
    examples: dict[str, list[str]] = field(default_factory=dict)  # partially masked
    name_column: bool = False


class Scanner:
    """Accumulates findings over batches."""

    def __init__(self, *, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self.rows_scanned = 0
        self._columns: dict[str, ColumnFindings] = {}

    def _found(self, col: ColumnFindings, kind: str, example: str) -> None:
        col.kinds[kind] = col.kinds.get(kind, 0) + 1
        examples = col.examples.setdefault(kind, [])
        if len(examples) < self.max_examples and example not in examples:
            examples.append(example)

    def scan(self, batch: pa.RecordBatch) -> None:
        """Scan string columns (all kinds) and integer columns (phone, bank card, resident ID)."""
        self.rows_scanned += batch.num_rows
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            typ = column.type
            text, integer = _is_text(typ) or _is_dict_text(typ), pa.types.is_integer(typ)
            if not (text or integer):
                continue
            col = self._columns.get(name)
            if col is None:
                col = self._columns[name] = ColumnFindings(name, name_column=is_name_column(name))
            values = column.to_pylist()
            col.values_scanned += len(values) - column.null_count
            if integer:
                for v in values:
                    if v is not None and (kind := _int_kind(v)) is not None:
                        self._found(col, kind, _mask_span(str(abs(v)), kind, "partial", b""))
                continue
            for v in values:
                if v is None:
                    continue
                if col.name_column and v.strip():
                    self._found(col, "person_name", mask_value(v.strip(), "partial", salt=b""))
                seen: set[str] = set()
                for s, e, kind in find_spans(v):
                    if kind not in seen:
                        seen.add(kind)
                        self._found(col, kind, _mask_span(v[s:e], kind, "partial", b""))

    def report(self) -> list[ColumnFindings]:
        """Columns with at least one finding, in the order they were first seen."""
        return [
            ColumnFindings(c.column, dict(c.kinds), c.values_scanned,
                           {k: list(v) for k, v in c.examples.items()}, c.name_column)
            for c in self._columns.values()
            if c.kinds
        ]


# -------------------------------------------------------------------------------- batches


@dataclass
class MaskRule:
    column: str
    strategy: str  # one of STRATEGIES
    whole_value: bool = False  # mask the whole cell instead of detected spans
    kinds: tuple[str, ...] | None = None  # restrict span masking to these kinds


def _mask_array(array: Any, rule: MaskRule, salt: bytes) -> Any:
    typ = array.type
    if _is_dict_text(typ):  # mask each distinct value once, keep the dictionary encoding
        return pa.DictionaryArray.from_arrays(
            array.indices, _mask_array(array.dictionary, rule, salt)
        )
    integer = pa.types.is_integer(typ)
    if not (integer or _is_text(typ)):
        raise ValueError(f"column {rule.column!r} has type {typ}; only text and integer "
                         "columns can be masked")
    placeholder = "[PERSON_NAME]" if is_name_column(rule.column) else "[REDACTED]"
    out: list[str | None] = []
    for v in array.to_pylist():
        if v is None:
            out.append(None)
            continue
        s = str(v) if integer else v
        if rule.whole_value:
            out.append(mask_value(s, rule.strategy, salt=salt, placeholder=placeholder))
        else:
            out.append(mask_text(s, rule.strategy, salt=salt, kinds=rule.kinds))
    return pa.array(out, type=pa.string() if integer else typ)


def mask_batch(
    batch: pa.RecordBatch, rules: Sequence[MaskRule], *, salt: bytes
) -> pa.RecordBatch:
    """Apply `rules`; same schema except that masked integer columns become strings.
    Nulls stay null; columns without a rule are untouched."""
    names = batch.schema.names
    by_column: dict[str, MaskRule] = {}
    for rule in rules:
        _check_strategy(rule.strategy)
        if rule.column not in names:
            raise ValueError(f"no column {rule.column!r} in the batch (columns: {names})")
        if rule.column in by_column:
            raise ValueError(f"more than one masking rule for column {rule.column!r}")
        if rule.kinds is not None and (unknown := set(rule.kinds) - set(KINDS)):
            raise ValueError(f"unknown PII kinds {sorted(unknown)} in the rule for "
                             f"{rule.column!r}; expected some of {KINDS}")
        by_column[rule.column] = rule
    if not by_column:
        return batch
    arrays, fields = [], []
    for i, f in enumerate(batch.schema):
        array = batch.column(i)
        if f.name in by_column:
            array = _mask_array(array, by_column[f.name], salt)
            f = f.with_type(array.type)
        arrays.append(array)
        fields.append(f)
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, batch.schema.metadata))


def rules_from_findings(findings: Sequence[ColumnFindings], strategy: str) -> list[MaskRule]:
    """Default rules: the whole cell for name columns, the found kinds' spans for the others."""
    _check_strategy(strategy)
    rules = []
    for f in findings:
        spans = tuple(k for k in SPAN_KINDS if f.kinds.get(k))
        if f.name_column:
            rules.append(MaskRule(f.column, strategy, whole_value=True))
        elif spans:
            rules.append(MaskRule(f.column, strategy, kinds=spans))
    return rules
