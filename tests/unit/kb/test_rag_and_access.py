"""Citation checking of RAG answers, access lists, and the stable chunk ids ingestion resumes by."""

from __future__ import annotations

import uuid

import pytest

from services.kb.models import KnowledgeBase
from services.kb.rag import Source, cite
from services.kb.service import Hit, can_read, can_write, check_access_list, chunk_uuid
from workbench.errors import ValidationFailed
from workbench.identity.principal import Principal, Role


def source(n: int, text: str) -> Source:
    return Source(n, Hit(chunk_id=f"c{n}", document_id=f"d{n}", document_name=f"doc{n}.md",
                         chunk_index=0, text=text, heading="", page=None, score=0.5))


SOURCES = [source(1, "Refunds are paid through the quokkapay system within 14 days."),
           source(2, "The office in Lyon opens at nine and closes at five.")]


def test_a_correct_citation_is_kept() -> None:
    answer, cited = cite("Refunds go through quokkapay within 14 days [1].", SOURCES)
    assert answer == "Refunds go through quokkapay within 14 days [1]."
    assert [c["n"] for c in cited] == [1]


def test_a_wrong_citation_is_moved_to_the_supporting_source() -> None:
    answer, cited = cite("The Lyon office opens at nine [1].", SOURCES)
    assert "[2]" in answer and "[1]" not in answer
    assert [c["chunk_id"] for c in cited] == ["c2"]


def test_an_uncited_sentence_gets_its_source_and_an_unsupported_one_none() -> None:
    answer, cited = cite("Refunds use quokkapay. Penguins cannot fly.", SOURCES)
    assert answer == "Refunds use quokkapay [1]. Penguins cannot fly."
    assert [c["n"] for c in cited] == [1]


def test_citing_a_source_that_was_not_given_is_dropped() -> None:
    answer, cited = cite("Refunds use quokkapay [7].", SOURCES)
    assert "[7]" not in answer and "[1]" in answer and len(cited) == 1


def test_no_sources_no_citations() -> None:
    assert cite("I don't know.", []) == ("I don't know.", [])


def kb(access: dict[str, list[str]]) -> KnowledgeBase:
    return KnowledgeBase(access=access)


def who(role: Role, user: uuid.UUID | None = None) -> Principal:
    return Principal.build(user_id=user or uuid.uuid4(), org_id=uuid.uuid4(), role=role)


def test_access_lists() -> None:
    open_kb = kb({})
    assert can_read(open_kb, who(Role.VIEWER)) and can_write(open_kb, who(Role.MEMBER))
    admins = kb({"read": ["role:admin"], "write": ["role:admin"]})
    assert not can_read(admins, who(Role.MEMBER)) and can_read(admins, who(Role.ADMIN))
    assert can_write(admins, who(Role.OWNER))
    named = uuid.uuid4()
    readers = kb({"read": ["role:member", f"user:{named}"], "write": [f"user:{named}"]})
    assert can_read(readers, who(Role.MEMBER)) and not can_write(readers, who(Role.MEMBER))
    assert can_write(readers, who(Role.VIEWER, named))
    assert not can_read(readers, who(Role.VIEWER))


@pytest.mark.parametrize("bad", [{"read": ["everyone"]}, {"admin": []},
                                 {"read": "role:member"}, {"write": ["user:not-a-uuid"]}])
def test_bad_access_lists_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationFailed):
        check_access_list(bad)


def test_chunk_ids_are_stable_per_document_generation_and_position() -> None:
    doc = uuid.uuid4()
    assert chunk_uuid(doc, 1, 0) == chunk_uuid(doc, 1, 0)
    assert len({chunk_uuid(doc, g, i) for g in (1, 2) for i in range(100)}) == 200
