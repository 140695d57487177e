"""Answers from a knowledge base: the question (rewritten from the conversation when it is a
follow-up), hybrid retrieval, a prompt of numbered sources, the chat model's answer — whole or
streamed — and citations that point at the chunks that support each sentence. When nothing
relevant is found the answer says so without asking the model to guess."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.kb import bm25
from services.kb.models import KnowledgeBase
from services.kb.service import Hit, KbService
from workbench.errors import ValidationFailed
from workbench.identity.principal import Principal

NOT_FOUND = ("I don't know: nothing in this knowledge base answers that question. Try other "
             "words, or add the document that holds the answer.")
SYSTEM = ("You answer questions using only the numbered sources below. Cite the sources you "
          "use with their numbers in square brackets, like [1]. If the sources do not contain "
          "the answer, say that you don't know.")
REWRITE = ("Rewrite the user's last question so that it can be understood without the "
           "conversation. Reply with the rewritten question only.")
_END = ".!?\u3002\uff01\uff1f"
_MARK = re.compile(r"\[(\d{1,2})\]")
_SENTENCE = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+|\n+")  # and CJK . ! ?


@dataclass
class Source:
    n: int
    hit: Hit

    def view(self, snippet: int = 300) -> dict[str, Any]:
        h = self.hit
        return {"n": self.n, "chunk_id": h.chunk_id, "document_id": h.document_id,
                "document_name": h.document_name, "chunk_index": h.chunk_index,
                "heading": h.heading, "page": h.page, "score": h.score,
                "text": h.text[:snippet] + ("…" if len(h.text) > snippet else "")}


@dataclass
class Prepared:
    question: str
    rewritten: str
    sources: list[Source]
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return bool(self.sources)


def _terms(text: str) -> set[str]:
    return set(bm25.analyze(text))


def check_messages(messages: Sequence[dict[str, str]]) -> None:
    if not messages or messages[-1].get("role") != "user" or not \
            messages[-1].get("content", "").strip():
        raise ValidationFailed("messages must end with the user's question",
                               extra={"field": "messages"})


class Rag:
    def __init__(self, service: KbService) -> None:
        self.service = service

    async def rewrite(self, p: Principal, model: str, messages: Sequence[dict[str, str]]
                      ) -> str:
        """The last question made standalone. The model's rewrite is kept when it carries the
        topic of earlier turns; otherwise (small models often just repeat the question) the
        earlier questions' terms are added to it, which is what retrieval needs."""
        question = messages[-1]["content"].strip()
        earlier = [m["content"] for m in messages[:-1] if m.get("role") == "user"]
        if not earlier:
            return question
        history = _terms(" ".join(earlier[-3:])) - _terms(question)
        if not history:
            return question
        convo = "\n".join(f"{m['role']}: {m['content'][:500]}" for m in messages[-7:])
        try:
            answer = await self.service.upstream.chat(
                p.org_id, p.user_id, model, [{"role": "system", "content": REWRITE},
                                             {"role": "user", "content": convo}],
                max_tokens=64, temperature=0)
            text = (answer["choices"][0]["message"].get("content") or "").strip()
        except Exception:
            text = ""
        text = text.splitlines()[0].strip() if text else ""
        if text and len(text) <= 400 and _terms(text) & history:
            return text
        previous = earlier[-1].strip()
        return f"{question} ({previous})"

    async def prepare(self, p: Principal, kb: KnowledgeBase, *,
                      messages: Sequence[dict[str, str]], model: str, top_k: int,
                      min_score: float, filters: dict[str, Any] | None,
                      context_tokens: int) -> Prepared:
        check_messages(messages)
        question = messages[-1]["content"].strip()
        rewritten = await self.rewrite(p, model, messages)
        hits = await self.service.retrieve(p, kb, query=rewritten, top_k=top_k,
                                           mode="hybrid", score_threshold=min_score,
                                           filters=filters)
        # Relevant only when the meaning matches: keyword overlap alone (a shared common word)
        # does not make a source.
        if not any(h.vector_score is not None for h in hits):
            return Prepared(question, rewritten, [])
        sources: list[Source] = []
        budget = context_tokens
        for h in hits:
            cost = max(1, len(h.text) // 4)
            if sources and cost > budget:
                break
            budget -= cost
            sources.append(Source(len(sources) + 1, h))
        context = "\n\n".join(
            f"[{src.n}] ({src.hit.document_name}"
            + (f", {src.hit.heading}" if src.hit.heading else "")
            + (f", page {src.hit.page}" if src.hit.page else "") + f")\n{src.hit.text}"
            for src in sources)
        history = [m for m in messages[:-1] if m.get("role") in ("user", "assistant")][-4:]
        msgs = [{"role": "system", "content": SYSTEM}, *history,
                {"role": "user", "content": f"Sources:\n{context}\n\nQuestion: {question}"}]
        return Prepared(question, rewritten, sources, msgs)

    async def answer(self, p: Principal, prepared: Prepared, model: str, max_tokens: int,
                     temperature: float) -> str:
        if not prepared.known:
            return NOT_FOUND
        out = await self.service.upstream.chat(p.org_id, p.user_id, model, prepared.messages,
                                               max_tokens=max_tokens, temperature=temperature)
        return str(out["choices"][0]["message"].get("content") or "").strip()

    def stream(self, p: Principal, prepared: Prepared, model: str, max_tokens: int,
               temperature: float) -> AsyncIterator[str]:
        return self.service.upstream.chat_stream(p.org_id, p.user_id, model, prepared.messages,
                                                 max_tokens=max_tokens, temperature=temperature)


def cite(answer: str, sources: Sequence[Source]) -> tuple[str, list[dict[str, Any]]]:
    """Citations that hold: each sentence of the answer keeps the source numbers it cites when
    that source shares its words, gets the source that supports it best when it cites none
    (or a wrong one), and cites nothing when no source supports it. Returns the answer with
    its markers rewritten accordingly and the sources cited, in order of first use."""
    if not sources:
        return answer, []
    by_n = {src.n: src for src in sources}
    source_terms = {src.n: _terms(src.hit.text + " " + src.hit.heading) for src in sources}
    used: list[int] = []
    out_sentences = []
    for sentence in _SENTENCE.split(answer):
        if not sentence.strip():
            continue
        plain = re.sub(r"\s+([.!?,;:])", r"\1", _MARK.sub("", sentence)).rstrip()
        terms = _terms(plain)
        support = {n: len(terms & t) for n, t in source_terms.items()}
        needed = max(1, min(2, len(terms)))
        claimed = [int(n) for n in _MARK.findall(sentence) if int(n) in by_n]
        keep = [n for n in dict.fromkeys(claimed) if support[n] >= needed]
        if not keep and terms:
            best = max(support, key=lambda n: (support[n], -n))
            if support[best] >= needed:
                keep = [best]
        for n in keep:
            if n not in used:
                used.append(n)
        marks = "".join(f"[{n}]" for n in keep)
        if marks:  # before the sentence's closing punctuation: "… 14 days [1]."
            body = plain.rstrip(_END)
            plain = f"{body} {marks}{plain[len(body):]}"
        out_sentences.append(plain)
    return " ".join(out_sentences), [by_n[n].view() for n in used]
