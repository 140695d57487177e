"""Per-organization content-safety rules (keywords, regexes, PII) that block or redact model input
and output, including output streamed piece by piece."""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

STAGES = ("input", "output", "both")
KINDS = ("keywords", "regex", "pii")
ACTIONS = ("block", "redact")
PII_KINDS = ("email", "phone", "cn_resident_id", "bank_card", "ip_address")

MAX_PATTERNS = 200
MAX_PATTERN_LEN = 500
REGEX_WINDOW = 256
# Numbers and IP addresses are at most ~45 chars; e-mail addresses run longer, so they get more.
_PII_HOLD = 64
_EMAIL_HOLD = 128
_CONTEXT = 64  # raw text kept before the scan start so look-behinds see what precedes it
_MAX_PENDING = 8192  # a match still growing past this is redacted in parts rather than held

Span = tuple[int, int]
Finder = Callable[[str, int], list[Span]]


class RuleError(ValueError):
    """A rule that cannot be compiled; the message names the problem."""


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    stage: str
    kind: str
    patterns: tuple[str, ...]
    action: str
    replacement: str = "[REDACTED]"


@dataclass(frozen=True)
class Hit:
    rule_id: str
    rule_name: str
    stage: str
    action: str
    kind: str
    count: int


@dataclass
class Verdict:
    blocked: bool
    text: str
    hits: list[Hit]
    blocked_by: Hit | None


class Blocked(Exception):
    def __init__(self, hit: Hit) -> None:
        super().__init__(f"blocked by safety rule {hit.rule_name!r}")
        self.hit = hit


@dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    find: Finder  # (text, pos) -> sorted disjoint spans starting at or after pos
    hold: int | None  # longest text a match depends on; None: the stream's regex window

    def hit(self, stage: str, count: int) -> Hit:
        r = self.rule
        return Hit(r.id, r.name, stage, r.action, r.kind, count)


def _union(spans: Iterable[Span]) -> list[Span]:
    """Sorted spans with overlapping ones merged (touching ones stay apart)."""
    out: list[Span] = []
    for s, e in sorted(spans):
        if out and s < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


# ------------------------------------------------------------------------------------ keywords

# Chinese/Japanese/Korean text has no spaces, so a CJK neighbour never glues onto an ASCII word.
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f"
_BEFORE = rf"(?:(?<!\w)|(?<=[{_CJK}]))"
_AFTER = rf"(?:(?!\w)|(?=[{_CJK}]))"
_ASCII_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _trie(node: dict[str, Any], first: bool) -> str:
    """Regex for a keyword trie; children come before the end of a word so the longest keyword
    wins, and factoring prefixes keeps 200 keywords as fast as a few."""
    alts = [(_BEFORE if first and ch in _ASCII_WORD else "") + re.escape(ch) + _trie(child, False)
            for ch, child in sorted(node.items()) if ch]
    if "" in node:  # a keyword ends here
        alts.append(node[""])
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def _keyword_finder(words: Sequence[str]) -> tuple[Finder, int]:
    root: dict[str, Any] = {}
    for w in words:
        node = root
        for ch in w:  # IGNORECASE matches char by char, so lower-case keys merge "A" and "a"
            low = ch.lower()
            node = node.setdefault(low if len(low) == 1 else ch, {})
        node[""] = _AFTER if w[-1] in _ASCII_WORD else ""
    pattern = re.compile(_trie(root, True), re.IGNORECASE)

    def find(text: str, pos: int) -> list[Span]:
        return [m.span() for m in pattern.finditer(text, pos) if m.end() > m.start()]

    # +1: the word-boundary look-ahead needs the character after the keyword
    return find, max(map(len, words)) + 1


def _regex_finder(rule: Rule) -> Finder:
    compiled: list[re.Pattern[str]] = []
    for i, p in enumerate(rule.patterns, 1):
        try:
            c = re.compile(p)
        except re.error as exc:
            raise RuleError(f"rule {rule.name!r}: pattern {i} is not a valid regex: {exc.msg}"
                            f" at position {exc.pos}") from exc
        if c.match("") is not None:  # it would "redact" between every two characters
            raise RuleError(f"rule {rule.name!r}: pattern {i} matches the empty string")
        compiled.append(c)

    def find(text: str, pos: int) -> list[Span]:
        # several patterns of one rule may overlap: their union is redacted, counted once
        return _union(m.span() for c in compiled for m in c.finditer(text, pos)
                      if m.end() > m.start())

    return find


# ----------------------------------------------------------------------------------------- PII

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_ID_PROVINCES = frozenset(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 "
    "61 62 63 64 65 71 81 82 83".split()
)


def valid_cn_resident_id(value: str) -> bool:
    """18 chars: area code, real birth date (1900..today), sequence, ISO 7064 MOD 11-2 check."""
    body = value[:17]
    if len(value) != 18 or not (body.isascii() and body.isdigit()) or body[:2] not in _ID_PROVINCES:
        return False
    try:
        born = _dt.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    if born.year < 1900 or born > _dt.date.today():
        return False
    total = sum(int(c) * w for c, w in zip(body, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == value[17].upper()


def luhn_ok(digits: str) -> bool:
    if not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


# re.ASCII: a CJK character right before or after a value does not glue onto it.
_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])", re.ASCII)
_IPV4 = re.compile(r"(?<!\w)(?<!\d\.)(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)", re.ASCII)
_IPV6 = re.compile(  # the look-ahead wants a colon early so plain hex words are skipped cheaply
    r"(?<![\w:])(?=[0-9A-Fa-f]{0,4}:)[0-9A-Fa-f:]{2,39}"
    r"(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)", re.ASCII)
# A run of digit groups joined by single spaces/dashes; split into values in `_number_spans`.
_NUMBER = re.compile(r"(?<![\w+])(?<!\d[-.])\+?\d+(?:[ -]\d+)*+[Xx]?", re.ASCII)
_GROUP = re.compile(r"\d+[Xx]?", re.ASCII)
_GLUED = re.compile(r"\w|[-.]\d", re.ASCII)  # after a number: the number goes on
_CN_MOBILE = re.compile(r"(?:0086)?1[3-9]\d{9}", re.ASCII)
_CARD_FIRST = frozenset("234569")


def _number_kinds(digits: str, plus: bool) -> set[str]:
    if not digits[-1].isdigit():  # a trailing X only ends a resident ID
        return {"cn_resident_id"} if not plus and valid_cn_resident_id(digits) else set()
    if plus:
        return {"phone"} if 8 <= len(digits) <= 15 and digits[0] != "0" else set()
    kinds = set()
    if len(digits) == 18 and valid_cn_resident_id(digits):
        kinds.add("cn_resident_id")
    if _CN_MOBILE.fullmatch(digits):
        kinds.add("phone")
    if 13 <= len(digits) <= 19 and digits[0] in _CARD_FIRST and luhn_ok(digits):
        kinds.add("bank_card")
    return kinds


def _number_spans(text: str, pos: int, kinds: frozenset[str]) -> list[Span]:
    out: list[Span] = []
    for m in _NUMBER.finditer(text, pos):
        plus = text[m.start()] == "+"
        groups = [g.span() for g in _GROUP.finditer(text, m.start() + plus, m.end())]
        glued = _GLUED.match(text, m.end()) is not None
        last = len(groups) - 1
        i = 0
        while i <= last:
            # a dash binds tighter than a space: a value never starts or ends at one
            if i and text[groups[i][0] - 1] == "-":
                i += 1
                continue
            lead = plus and i == 0
            j, size = i, groups[i][1] - groups[i][0]
            while j < last and size + groups[j + 1][1] - groups[j + 1][0] <= 19:
                j += 1
                size += groups[j][1] - groups[j][0]
            for k in range(j, i - 1, -1):  # the longest value starting at group i wins
                if (text[groups[k][1]] == "-") if k < last else glued:
                    continue
                # "12 34 56 ..." is a list of numbers, not one: without a "+" groups need 3+
                if not lead and k > i and any(e - s < 3 for s, e in groups[i:k + 1]):
                    continue
                digits = "".join(text[s:e] for s, e in groups[i:k + 1])
                if kinds & _number_kinds(digits, lead):
                    out.append((m.start() if lead else groups[i][0], groups[k][1]))
                    i = k
                    break
            i += 1
    return out


def _valid_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return candidate.strip(":.") != ""  # "::" alone is no address in prose


def _scan(pattern: re.Pattern[str], text: str, pos: int, ok: Callable[[str], bool]) -> list[Span]:
    out: list[Span] = []
    while (m := pattern.search(text, pos)) is not None:
        if ok(m.group()):
            out.append(m.span())
            pos = m.end()
        else:
            pos = m.start() + 1  # not valid: a shorter candidate may start inside it
    return out


def _pii_finder(rule: Rule) -> tuple[Finder, int]:
    kinds = frozenset(p.strip().lower() for p in rule.patterns)
    unknown = sorted(kinds - set(PII_KINDS))
    if unknown:
        raise RuleError(f"rule {rule.name!r}: unknown pii kind {unknown[0]!r} "
                        f"(expected one of {', '.join(PII_KINDS)})")

    def find(text: str, pos: int) -> list[Span]:
        spans: list[Span] = []
        if "email" in kinds and "@" in text:
            spans += (m.span() for m in _EMAIL.finditer(text, pos))
        if "ip_address" in kinds:
            if text.count(".") >= 3:
                spans += _scan(_IPV4, text, pos, _valid_ip)
            if ":" in text:
                spans += _scan(_IPV6, text, pos, _valid_ip)
        if kinds & {"phone", "cn_resident_id", "bank_card"}:
            spans += _number_spans(text, pos, kinds)
        return _union(spans)  # e.g. a phone number that is an e-mail's local part

    return find, _EMAIL_HOLD if "email" in kinds else _PII_HOLD


def compile_rule(rule: Rule) -> CompiledRule:
    """Validate and compile one rule; RuleError says what is wrong with it."""
    for attr, allowed in (("stage", STAGES), ("kind", KINDS), ("action", ACTIONS)):
        value = getattr(rule, attr)
        if value not in allowed:
            raise RuleError(f"rule {rule.name!r}: unknown {attr} {value!r} "
                            f"(expected one of {', '.join(allowed)})")
    if not rule.patterns:
        raise RuleError(f"rule {rule.name!r}: no patterns (an empty {rule.kind} list)")
    if len(rule.patterns) > MAX_PATTERNS:
        raise RuleError(f"rule {rule.name!r}: {len(rule.patterns)} patterns, at most "
                        f"{MAX_PATTERNS} allowed")
    for i, p in enumerate(rule.patterns, 1):
        if not isinstance(p, str) or not p.strip():
            raise RuleError(f"rule {rule.name!r}: pattern {i} is empty")
        if len(p) > MAX_PATTERN_LEN:
            raise RuleError(f"rule {rule.name!r}: pattern {i} is too long ({len(p)} chars, "
                            f"at most {MAX_PATTERN_LEN})")
    if rule.kind == "keywords":
        find, hold = _keyword_finder([p.strip() for p in rule.patterns])
        return CompiledRule(rule, find, hold)
    if rule.kind == "regex":
        return CompiledRule(rule, _regex_finder(rule), None)
    find, hold = _pii_finder(rule)
    return CompiledRule(rule, find, hold)


# -------------------------------------------------------------------------------------- policy

Found = list[tuple[int, CompiledRule, list[Span]]]  # (rule index, rule, spans)


def _redacted(text: str, lo: int, hi: int, found: Found) -> str:
    """text[lo:hi] with every span replaced; overlapping spans of different rules become one,
    replaced by the earliest rule's replacement so the result stays well-formed."""
    tagged = sorted((s, e, idx, cr.rule.replacement) for idx, cr, spans in found for s, e in spans)
    merged: list[tuple[int, int, int, str]] = []
    for s, e, idx, rep in tagged:
        if merged and s < merged[-1][1]:
            ps, pe, pidx, prep = merged[-1]
            if idx < pidx:
                pidx, prep = idx, rep
            merged[-1] = (ps, max(pe, e), pidx, prep)
        else:
            merged.append((s, e, idx, rep))
    out: list[str] = []
    at = lo
    for s, e, _, rep in merged:
        out += (text[at:s], rep)
        at = e
    out.append(text[at:hi])
    return "".join(out)


class Policy:
    def __init__(self, rules: Sequence[Rule]) -> None:
        self._rules = [compile_rule(r) for r in rules]
        self._staged = {
            stage: [(i, cr) for i, cr in enumerate(self._rules) if cr.rule.stage in (stage, "both")]
            for stage in ("input", "output")
        }

    @property
    def empty(self) -> bool:
        return not self._rules

    def _for(self, stage: str) -> list[tuple[int, CompiledRule]]:
        if stage not in self._staged:
            raise ValueError(f"stage must be 'input' or 'output', not {stage!r}")
        return self._staged[stage]

    def check(self, text: str, stage: str) -> Verdict:
        """Block rules first (any hit blocks, nothing is redacted), then every redact rule."""
        rules = self._for(stage)
        blocks = [cr.hit(stage, n) for _, cr in rules
                  if cr.rule.action == "block" and (n := len(cr.find(text, 0)))]
        if blocks:
            return Verdict(True, text, blocks, blocks[0])
        found = [(i, cr, spans) for i, cr in rules
                 if cr.rule.action == "redact" and (spans := cr.find(text, 0))]
        hits = [cr.hit(stage, len(spans)) for _, cr, spans in found]
        return Verdict(False, _redacted(text, 0, len(text), found), hits, None)

    def check_messages(
        self, messages: list[dict[str, Any]]
    ) -> tuple[Verdict, list[dict[str, Any]]]:
        """Check every text of OpenAI chat messages as input. The verdict's text is the checked
        texts joined by newlines; the messages come back with redactions (unchanged if blocked)."""
        texts = [t for m in messages for t in _texts(m)]
        verdicts = [self.check(t, "input") for t in texts]
        blocked = any(v.blocked for v in verdicts)
        if blocked:  # count only block hits, as check() does for a single blocked text
            verdicts = [v for v in verdicts if v.blocked]
        counts: dict[str, int] = {}
        for h in (h for v in verdicts for h in v.hits):
            counts[h.rule_id] = counts.get(h.rule_id, 0) + h.count
        hits = [cr.hit("input", counts[cr.rule.id]) for _, cr in self._for("input")
                if cr.rule.id in counts]
        blocked_by = next((h for h in hits if h.action == "block"), None)
        if blocked:
            return Verdict(True, "\n".join(texts), hits, blocked_by), list(messages)
        redacted = iter(v.text for v in verdicts)
        out = [_with_texts(m, redacted) for m in messages]
        return Verdict(False, "\n".join(v.text for v in verdicts), hits, None), out

    def stream(self, regex_window: int = REGEX_WINDOW) -> StreamGuard:
        if regex_window < 1:
            raise ValueError("regex_window must be positive")
        return StreamGuard(self._for("output"), regex_window)


def _texts(message: dict[str, Any]) -> list[str]:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if _is_text_part(p)]
    return []


def _is_text_part(part: Any) -> bool:
    return (isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str))


def _with_texts(message: dict[str, Any], texts: Iterable[str]) -> dict[str, Any]:
    """The message with its texts replaced in order by `texts` (copied only if one changed)."""
    source = iter(texts)
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        new = next(source)
        return message if new == content else {**message, "content": new}
    if not isinstance(content, list):
        return message
    parts, changed = [], False
    for p in content:
        if _is_text_part(p):
            new = next(source)
            if new != p["text"]:
                p, changed = {**p, "text": new}, True
        parts.append(p)
    return {**message, "content": parts} if changed else message


class StreamGuard:
    """Feed output pieces; get back text that is safe to emit now. Holds back a tail just long
    enough that no match can straddle the boundary (keywords: the longest keyword; regexes: a
    window, default 256 chars; PII: 64 chars, 128 with e-mail). Matches are finalised only when
    they end before that tail, so for matches shorter than it the emitted text equals what
    Policy.check would give on the whole text."""

    def __init__(self, rules: list[tuple[int, CompiledRule]], regex_window: int) -> None:
        self._rules = rules
        self._hold = max((regex_window if cr.hold is None else cr.hold for _, cr in rules),
                         default=0)
        self._keep = max(self._hold, _CONTEXT)
        self._ctx = ""  # raw text already released (its tail), for look-behinds
        self._buf = ""  # raw text not released yet
        self._counts: dict[int, int] = {}
        self._blocked: Hit | None = None

    @property
    def hits(self) -> list[Hit]:
        """Redaction hits so far, one per rule in rule order, counts summed."""
        return [cr.hit("output", self._counts[i]) for i, cr in self._rules if i in self._counts]

    def feed(self, piece: str) -> str:
        """Raises Blocked as soon as a block rule certainly matches the text seen so far."""
        if self._blocked is not None:
            raise Blocked(self._blocked)
        self._buf += piece
        if not self._rules:
            out, self._buf = self._buf, ""
            return out
        if len(self._buf) <= self._hold:  # nothing can be released yet
            return ""
        return self._release(final=False)

    def finish(self) -> str:
        """Release the held-back tail (redacted); may raise Blocked."""
        if self._blocked is not None:
            raise Blocked(self._blocked)
        return self._release(final=True) if self._buf else ""

    def _release(self, final: bool) -> str:
        window = self._ctx + self._buf
        base = len(self._ctx)
        limit = len(window) if final else len(window) - self._hold
        found = [(i, cr, cr.find(window, base)) for i, cr in self._rules]
        forced = not final and len(self._buf) > self._hold + _MAX_PENDING
        if forced:  # a match that keeps growing: redact what is there now, in pieces
            found = [(i, cr, [(s, min(e, limit)) for s, e in spans if s < limit])
                     for i, cr, spans in found]
        for _, cr, spans in found:
            if cr.rule.action == "block" and (n := sum(e <= limit for _, e in spans)):
                self._blocked = cr.hit("output", n)
                raise Blocked(self._blocked)
        # Never cut inside a match: more text could still change how it ends. Going down the
        # starts, one pass suffices since moving the cut left only reaches earlier starts.
        cut = limit
        for s, e in sorted((sp for _, _, spans in found for sp in spans), reverse=True):
            if s < cut < e:
                cut = s
        done = [(i, cr, [sp for sp in spans if sp[1] <= cut]) for i, cr, spans in found
                if cr.rule.action == "redact"]
        for i, _, spans in done:
            if spans:
                self._counts[i] = self._counts.get(i, 0) + len(spans)
        out = _redacted(window, base, cut, done)
        self._ctx = window[max(0, cut - self._keep):cut]
        self._buf = window[cut:]
        return out
