"""Content-safety rules: keywords, regexes and PII, block vs redact, stages, chat messages, and
streamed output that must never let a match slip through between two pieces."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from services.inference.safety import (
    PII_KINDS,
    Blocked,
    Hit,
    Policy,
    Rule,
    RuleError,
    compile_rule,
    luhn_ok,
    valid_cn_resident_id,
)


def rule(kind: str, *patterns: str, action: str = "redact", stage: str = "both",
         id: str = "r1", replacement: str = "[REDACTED]") -> Rule:
    return Rule(id=id, name=f"rule {id}", stage=stage, kind=kind, patterns=patterns,
                action=action, replacement=replacement)


def redact(policy: Policy, text: str, stage: str = "output") -> str:
    v = policy.check(text, stage)
    assert not v.blocked
    return v.text


def with_id_check(body17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    total = sum(int(c) * w for c, w in zip(body17, weights, strict=True))
    return body17 + "10X98765432"[total % 11]


def with_luhn(body: str) -> str:
    return next(body + d for d in "0123456789" if luhn_ok(body + d))


ID_X = with_id_check("11010519491231002")  # ends in X
ID_9 = with_id_check("44030419900101123")
CARD = with_luhn("622202123456789012")  # 19 digits, UnionPay
VISA = "4111111111111111"


# --------------------------------------------------------------------------------- keywords

def test_keyword_block_is_case_insensitive() -> None:
    p = Policy([rule("keywords", "Forbidden Topic", action="block")])
    v = p.check("tell me about the FORBIDDEN topic please", "input")
    assert v.blocked and v.text == "tell me about the FORBIDDEN topic please"
    assert v.blocked_by == Hit("r1", "rule r1", "input", "block", "keywords", 1)
    assert v.hits == [v.blocked_by]
    assert not p.check("a permitted topic", "input").blocked


def test_keyword_redact_cjk_and_ascii_word_boundaries() -> None:
    p = Policy([rule("keywords", "机密", "ass", "Secret")])
    assert redact(p, "这是机密文件、不要外传") == "这是[REDACTED]文件、不要外传"
    assert redact(p, "a class of compassion, assets, bass") == "a class of compassion, assets, bass"
    assert redact(p, "you ass! ASS, (ass) ass_hole ass2") == (
        "you [REDACTED]! [REDACTED], ([REDACTED]) ass_hole ass2")
    # Chinese has no spaces: an ASCII word between CJK characters is still a word
    assert redact(p, "这个ass很secret的") == "这个[REDACTED]很[REDACTED]的"
    assert redact(p, "top-SECRET.") == "top-[REDACTED]."
    assert redact(p, "secretary") == "secretary"


def test_keyword_longest_wins_and_duplicates_collapse() -> None:
    p = Policy([rule("keywords", "bad", "bad word", "BAD", replacement="*")])
    v = p.check("a bad word and a bad one", "input")
    assert v.text == "a * and a * one"
    assert v.hits[0].count == 2


# ------------------------------------------------------------------------------------ regex

def test_regex_redact_with_groups_replaces_the_whole_match() -> None:
    p = Policy([rule("regex", r"(?P<user>[a-z]+)-(\d+)-(?P=user)", r"(ab)\1", replacement="#")])
    v = p.check("x foo-12-foo y bar-3-baz abab", "output")
    assert v.text == "x # y bar-3-baz #"
    assert v.hits[0].count == 2


def test_regex_is_case_sensitive_unless_asked() -> None:
    assert redact(Policy([rule("regex", r"token_\w+")]), "TOKEN_A token_b") == "TOKEN_A [REDACTED]"
    assert redact(Policy([rule("regex", r"(?i)token_\w+")]), "TOKEN_A") == "[REDACTED]"


def test_overlapping_matches_of_several_rules_merge() -> None:
    p = Policy([rule("regex", r"abc", id="a", replacement="<A>"),
                rule("regex", r"bcd", id="b", replacement="<B>"),
                rule("keywords", "xy", id="c", replacement="<C>")])
    v = p.check("abcd xy abc", "input")
    assert v.text == "<A> <C> <A>"
    assert [(h.rule_id, h.count) for h in v.hits] == [("a", 2), ("b", 1), ("c", 1)]


# -------------------------------------------------------------------------------------- PII

@pytest.mark.parametrize(("kind", "valid", "invalid"), [
    ("email", ["a.b+tag@example.co.uk", "13812345678@qq.com"], ["user@localhost", "@x.com"]),
    ("phone", ["13812345678", "138 1234 5678", "138-1234-5678", "+86 138 1234 5678",
               "0086 13812345678", "+1 555 123 4567", "+4930123456"],
     ["12812345678", "138123456789", "+1234567", "+1234567890123456"]),
    ("cn_resident_id", [ID_X, ID_X.lower(), ID_9],
     [ID_9[:-1] + str((int(ID_9[-1]) + 1) % 10), "110105" + "19491331" + "0021",
      "000000199001011234", "110105" + "21000101" + "123X"]),
    ("bank_card", [VISA, "4111 1111 1111 1111", "4111-1111-1111-1111", CARD],
     ["4111111111111112", "1111111111111117", "4111 1111 1111 1112"]),
    ("ip_address", ["192.168.1.1", "10.0.0.255", "fe80::1", "2001:db8::ff00:42:8329",
                    "::ffff:1.2.3.4"], ["999.1.1.1", "1.2.3", "12:30:45", "::", "01.2.3.4"]),
])
def test_pii_kind(kind: str, valid: list[str], invalid: list[str]) -> None:
    p = Policy([rule("pii", kind, replacement=f"[{kind}]")])
    for value in valid:
        for text in (value, f"见 {value}、谢谢", f"value: {value}.", f"中文{value}中文"):
            assert redact(p, text) == text.replace(value, f"[{kind}]"), text
    for value in invalid:
        assert redact(p, f"see {value} here") == f"see {value} here", value


def test_pii_is_boundary_aware() -> None:
    p = Policy([rule("pii", *PII_KINDS)])
    for text in ("x13812345678", "13812345678kg", "ab192.168.1.1", "v1.2.3.4.5", f"{VISA}0",
                 f"9{VISA}", "3.14159265358979323", "order 2024-01-05-13812345678",
                 "scores 42 17 33 56 78 91 23 88"):
        assert redact(p, text) == text, text
    assert redact(p, f"2024-01-05 13812345678 {VISA}") == "2024-01-05 [REDACTED] [REDACTED]"


def test_checksum_helpers() -> None:
    assert valid_cn_resident_id(ID_X) and valid_cn_resident_id(ID_9)
    assert not valid_cn_resident_id("11010520991231002X")  # born in the future
    assert not valid_cn_resident_id(ID_9[:17] + "Y")
    assert luhn_ok(VISA) and luhn_ok(CARD) and not luhn_ok("4111111111111112")


# ------------------------------------------------------------------- block, stages, counting

def test_block_beats_redact() -> None:
    p = Policy([rule("pii", "email", id="mail"),
                rule("keywords", "attack plan", action="block", id="blk")])
    v = p.check("mail a@b.com the attack plan", "input")
    assert v.blocked and v.text == "mail a@b.com the attack plan"
    assert v.blocked_by is not None and v.blocked_by.rule_id == "blk"
    assert [h.rule_id for h in v.hits] == ["blk"]


def test_stage_filtering() -> None:
    p = Policy([rule("keywords", "alpha", stage="input", id="in"),
                rule("keywords", "beta", stage="output", id="out"),
                rule("keywords", "gamma", stage="both", id="both")])
    assert redact(p, "alpha beta gamma", "input") == "[REDACTED] beta [REDACTED]"
    assert redact(p, "alpha beta gamma", "output") == "alpha [REDACTED] [REDACTED]"
    assert [h.stage for h in p.check("gamma", "output").hits] == ["output"]
    with pytest.raises(ValueError, match="stage"):
        p.check("x", "both")
    assert not p.empty and Policy([]).empty
    assert Policy([]).check("anything", "input") == Policy([]).check("anything", "input")


def test_hits_counted_per_rule() -> None:
    p = Policy([rule("keywords", "foo", "bar", id="k"), rule("pii", "email", "phone", id="p")])
    v = p.check("foo bar FOO a@b.cn 13812345678 c@d.org", "output")
    assert [(h.rule_id, h.kind, h.action, h.count) for h in v.hits] == [
        ("k", "keywords", "redact", 3), ("p", "pii", "redact", 3)]
    assert p.check("nothing here", "output").hits == []


def test_check_messages_redacts_strings_and_parts_without_touching_the_rest() -> None:
    p = Policy([rule("keywords", "secret", id="k"), rule("pii", "email", id="e")])
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "keep the secret"},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "mail a@b.com a secret"},
            {"type": "image_url", "image_url": {"url": "http://x/secret.png"}},
            {"type": "text", "text": "nothing"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "user", "content": "clean"},
    ]
    before = copy.deepcopy(messages)
    v, out = p.check_messages(messages)
    assert messages == before  # the caller's messages are not mutated
    assert not v.blocked
    assert [(h.rule_id, h.count) for h in v.hits] == [("k", 2), ("e", 1)]
    assert out[0] == {"role": "system", "content": "keep the [REDACTED]"}
    assert out[1]["name"] == "ann"
    assert out[1]["content"][0] == {"type": "text", "text": "mail [REDACTED] a [REDACTED]"}
    assert out[1]["content"][1:] == messages[1]["content"][1:]
    assert out[2] is messages[2] and out[3] is messages[3]
    assert "secret" not in v.text and "nothing" in v.text


def test_check_messages_blocked() -> None:
    p = Policy([rule("keywords", "secret", id="k"),
                rule("keywords", "jailbreak", action="block", id="b")])
    messages: list[dict[str, Any]] = [{"role": "user", "content": "a jailbreak"},
                {"role": "user", "content": [{"type": "text", "text": "JAILBREAK secret"}]}]
    v, out = p.check_messages(messages)
    assert v.blocked and out == messages
    assert v.blocked_by == Hit("b", "rule b", "input", "block", "keywords", 2)
    assert v.hits == [v.blocked_by]


# ------------------------------------------------------------------------------- bad rules

@pytest.mark.parametrize(("bad", "message"), [
    (rule("regex", "ok", "(unbalanced"), r"pattern 2 is not a valid regex: missing \), "
                                         r"unterminated subpattern at position 0"),
    (rule("regex", "a*"), "matches the empty string"),
    (rule("pii", "email", "ssn"), "unknown pii kind 'ssn'"),
    (rule("keywords"), "no patterns"),
    (rule("keywords", "ok", "  "), "pattern 2 is empty"),
    (rule("keywords", "x", action="warn"), "unknown action 'warn'"),
    (rule("keywords", "x", stage="log"), "unknown stage 'log'"),
    (rule("magic", "x"), "unknown kind 'magic'"),
    (rule("regex", "a" * 501), "pattern 1 is too long"),
    (rule("keywords", *[f"w{i}" for i in range(201)]), "201 patterns, at most 200"),
])
def test_bad_rules_raise_rule_error(bad: Rule, message: str) -> None:
    with pytest.raises(RuleError, match=message):
        compile_rule(bad)
    with pytest.raises(RuleError, match="rule 'rule r1'"):
        Policy([rule("keywords", "fine", id="ok"), bad])


# ---------------------------------------------------------------------------------- streams

def run_stream(policy: Policy, pieces: list[str]) -> tuple[list[str], Blocked | None]:
    guard = policy.stream()
    emitted: list[str] = []
    try:
        for piece in pieces:
            emitted.append(guard.feed(piece))
        emitted.append(guard.finish())
    except Blocked as exc:
        return emitted, exc
    return emitted, None


def test_stream_keyword_split_into_single_characters_is_redacted() -> None:
    p = Policy([rule("keywords", "password", "机密")])
    text = "the PASSWORD is hunter2, 这是机密。" * 3
    emitted, blocked = run_stream(p, list(text))
    assert blocked is None
    assert "".join(emitted) == p.check(text, "output").text
    assert "password" not in "".join(emitted).lower() and "机密" not in "".join(emitted)
    assert any(emitted[:-1])  # text is released before the end, not all held back


def test_stream_block_keyword_is_never_emitted() -> None:
    p = Policy([rule("keywords", "launch codes", action="block", id="b"),
                rule("keywords", "class", id="r")])
    text = "a class of words, then the Launch Codes are 1234 and more text after it " * 2
    emitted, blocked = run_stream(p, list(text))
    assert blocked is not None
    assert blocked.hit == Hit("b", "rule b", "output", "block", "keywords", 1)
    out = "".join(emitted)
    assert out.startswith("a [REDACTED] of words, then")
    assert "laun" not in out.lower()  # not even the start of it: it was held back
    guard = p.stream()
    with pytest.raises(Blocked):
        guard.feed(text)
    with pytest.raises(Blocked):  # a blocked stream stays blocked
        guard.feed("more")


def test_stream_finish_flushes_the_tail_and_passes_through_without_rules() -> None:
    p = Policy([rule("keywords", "secret"), rule("pii", "email", stage="input")])
    guard = p.stream()
    assert guard.feed("my sec") == ""  # no longer than the hold: nothing is safe yet
    assert guard.feed("ret is a@b.com") == "my [REDACTED] is "
    assert guard.finish() == "a@b.com"  # e-mail is redacted on input only
    assert guard.hits == [Hit("r1", "rule r1", "output", "redact", "keywords", 1)]
    assert guard.finish() == ""
    open_guard = Policy([rule("keywords", "x", stage="input")]).stream()
    assert open_guard.feed("x marks") == "x marks" and open_guard.finish() == ""


def test_stream_regex_window_and_long_matches() -> None:
    p = Policy([rule("regex", r"sk-[A-Za-z0-9]{20,40}", id="key"), rule("regex", r"a+", id="a")])
    guard = p.stream(regex_window=64)
    pieces = ["key: sk-", "abcdefghij", "KLMNOPQRST", "uvw done ", "b" * 100]
    out = "".join(guard.feed(x) for x in pieces) + guard.finish()
    assert out == p.check("".join(pieces), "output").text
    # a match longer than any window is still never emitted in clear, only split up
    guard = p.stream()
    out = "".join(guard.feed(c) for c in "x" + "a" * 20000 + "x")
    assert out.startswith("x[REDACTED]") and set(out) <= set("x[REDACTED]")


def _sample_text(rnd: random.Random) -> str:
    vocab = ["secret", "SECRET", "秘密", "class", "ass", "token_abc123", "a@b.com",
             "13812345678", "138 1234 5678", ID_X, VISA, "4111 1111 1111 1111", "10.0.0.1",
             "fe80::1", "12:30", "3.14", "42", "+1 555 123 4567", "编号", "the", "word"]
    seps = [" ", "", "\n", ", ", "-", ".", "的"]
    return "".join(rnd.choice(vocab) + rnd.choice(seps) for _ in range(rnd.randint(0, 80)))


def test_stream_random_piece_sizes_match_whole_text_check() -> None:
    p = Policy([rule("keywords", "secret", "秘密", "ass", id="k", replacement="<K>"),
                rule("regex", r"token_[a-z]+\d*", id="re", replacement="<R>"),
                rule("pii", *PII_KINDS, id="pii", replacement="<P>"),
                rule("keywords", "word", stage="input", action="block", id="in-only")])
    rnd = random.Random(20240611)
    for _ in range(150):
        text = _sample_text(rnd)
        guard = p.stream(regex_window=rnd.choice([32, 256]))
        out, pos = [], 0
        while pos < len(text):
            size = rnd.randint(1, 24)
            out.append(guard.feed(text[pos:pos + size]))
            pos += size
        out.append(guard.finish())
        expected = p.check(text, "output")
        assert "".join(out) == expected.text, text
        assert guard.hits == expected.hits, text
