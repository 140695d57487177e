"""Request and response models of the kb service."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from workbench.schemas import PartialUpdate, RequestModel, example

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
ModelName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                             max_length=200)]
Strategy = Literal["recursive", "fixed", "paragraph"]
Update = Literal["manual", "daily", "weekly"]
Filters = Annotated[dict[str, Any], Field(max_length=16, description=(
    "Document metadata field → value (or list of values, any of which matches); also "
    "`document_id` and `format`. Searches are always limited to your organization and this "
    "knowledge base."))]


class Access(RequestModel):
    read: Annotated[list[str], Field(max_length=500)] = Field(
        default_factory=list, description="'role:<role>' or 'user:<user id>' entries; empty: "
                                          "every member whose role can read")
    write: Annotated[list[str], Field(max_length=500)] = Field(default_factory=list)


class KbCreate(RequestModel):
    model_config = RequestModel.model_config | example({
        "project_id": "01a20900-…", "name": "support-manuals",
        "description": "Product manuals and SOPs", "embedding_model": "embedder",
        "chat_model": "assistant", "chunk_strategy": "recursive", "chunk_size": 256,
        "chunk_overlap": 32, "update_strategy": "weekly",
        "access": {"read": ["role:member"], "write": ["role:admin"]}})

    project_id: uuid.UUID
    name: Name
    description: Annotated[str, StringConstraints(max_length=2000)] = ""
    embedding_model: ModelName = Field(description=(
        "An embedding deployment or route of your organization in the inference service"))
    chat_model: ModelName | None = Field(default=None, description=(
        "The chat model answers come from unless a chat request names one"))
    chunk_strategy: Strategy = "recursive"
    chunk_size: int = Field(default=256, ge=32, le=8192, description="Tokens per chunk")
    chunk_overlap: int = Field(default=32, ge=0, le=2048)
    update_strategy: Update = "manual"
    access: Access = Field(default_factory=Access)

    @model_validator(mode="after")
    def _overlap(self) -> KbCreate:
        if self.chunk_overlap * 2 > self.chunk_size:
            raise ValueError("chunk_overlap may be at most half of chunk_size")
        return self


class KbUpdate(PartialUpdate):
    model_config = RequestModel.model_config | example({"update_strategy": "daily"})
    _not_null = ("name", "chunk_strategy", "chunk_size", "chunk_overlap", "update_strategy",
                 "access", "description")

    name: Name | None = None
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    chat_model: ModelName | None = None
    chunk_strategy: Strategy | None = None
    chunk_size: int | None = Field(default=None, ge=32, le=8192)
    chunk_overlap: int | None = Field(default=None, ge=0, le=2048)
    update_strategy: Update | None = None
    access: Access | None = None


class KbRead(BaseModel):
    model_config = ConfigDict(from_attributes=True) | example({
        "id": "01a20910-…", "project_id": "01a20900-…", "name": "support-manuals",
        "description": "", "embedding_model": "embedder", "embedding_dim": 384,
        "chat_model": "assistant", "chunk_strategy": "recursive", "chunk_size": 256,
        "chunk_overlap": 32, "update_strategy": "weekly",
        "access": {"read": ["role:member"], "write": []}, "document_count": 12,
        "chunk_count": 340, "last_refresh_at": None, "next_refresh_at": "2026-11-30T12:00:00Z",
        "created_by": "user:01a2…", "created_at": "2026-11-23T12:00:00Z",
        "updated_at": "2026-11-23T12:00:00Z"})

    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    description: str
    embedding_model: str
    embedding_dim: int
    chat_model: str | None
    chunk_strategy: str
    chunk_size: int
    chunk_overlap: int
    update_strategy: str
    access: dict[str, list[str]]
    document_count: int
    chunk_count: int
    last_refresh_at: datetime | None
    next_refresh_at: datetime | None
    created_by: str
    created_at: datetime
    updated_at: datetime


class DocumentRead(BaseModel):
    model_config = ConfigDict(from_attributes=True) | example({
        "id": "01a20920-…", "kb_id": "01a20910-…", "name": "returns-policy.pdf",
        "format": "pdf", "content_type": "application/pdf", "size_bytes": 182044,
        "sha256": "9f2c…", "source": {"type": "upload"}, "metadata": {"team": "support"},
        "status": "processing", "error": "", "error_code": "", "generation": 1,
        "live_generation": 0, "chunks_total": 48, "chunks_done": 32, "attempts": 1,
        "indexed_at": None, "created_by": "user:01a2…", "created_at": "2026-11-23T12:00:00Z",
        "updated_at": "2026-11-23T12:00:02Z"})

    id: uuid.UUID
    kb_id: uuid.UUID
    name: str
    format: str | None
    content_type: str
    size_bytes: int
    sha256: str
    source: dict[str, Any]
    metadata: dict[str, Any] = Field(validation_alias=AliasChoices("meta", "metadata"))
    status: str
    error: str
    error_code: str
    generation: int
    live_generation: int
    chunks_total: int
    chunks_done: int
    attempts: int
    indexed_at: datetime | None
    created_by: str
    created_at: datetime
    updated_at: datetime


class DocumentAccepted(DocumentRead):
    queued: bool = Field(default=True, description="False when the same content was uploaded "
                                              "before")


class ImportRequest(RequestModel):
    model_config = RequestModel.model_config | example({
        "dataset_id": "01a208f0-…", "version": 3, "name": "faq.jsonl",
        "metadata": {"team": "support"}})

    dataset_id: uuid.UUID
    version: int | None = Field(default=None, ge=1, description="Default: the latest")
    name: Name | None = Field(default=None, description="Default: the version's file name")
    metadata: dict[str, Any] = Field(default_factory=dict, max_length=32)


class Progress(BaseModel):
    model_config = example({
        "documents_total": 52, "documents_done": 50, "documents_failed": 1,
        "documents_pending": 1, "chunks_done": 1480, "chunks_total": 1512,
        "by_status": {"indexed": 50, "failed": 1, "processing": 1}})

    documents_total: int
    documents_done: int
    documents_failed: int
    documents_pending: int
    chunks_done: int
    chunks_total: int
    by_status: dict[str, int]
    searchable_chunks: int | None = None
    vectors: int | None = None


class ChunkRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    document_id: uuid.UUID
    generation: int
    idx: int
    text: str
    heading: str
    page: int | None
    token_count: int


class RetrieveRequest(RequestModel):
    model_config = RequestModel.model_config | example({
        "query": "How long do customers have to return a product?", "top_k": 5,
        "mode": "hybrid", "score_threshold": None, "filters": {"team": "support"}})

    query: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                            max_length=4000)]
    top_k: int = Field(default=5, ge=1, le=100)
    mode: Literal["vector", "keyword", "hybrid"] = "hybrid"
    score_threshold: float | None = Field(default=None, description=(
        "vector: least cosine similarity; keyword: least BM25 score; hybrid: applied to the "
        "vector side before fusion"))
    filters: Filters = Field(default_factory=dict)
    vector_weight: float = Field(default=0.75, ge=0, le=1, description=(
        "hybrid: the vector side's share of the rank fusion, the keyword side has the rest "
        "(0.75 as Weaviate's alpha: meaning leads, exact terms lift)"))


class HitRead(BaseModel):
    chunk_id: str
    document_id: str
    document_name: str
    chunk_index: int
    text: str
    heading: str
    page: int | None
    score: float
    vector_score: float | None = None
    keyword_score: float | None = None
    metadata: dict[str, Any]


class RetrieveResponse(BaseModel):
    model_config = example({"mode": "hybrid", "hits": [{
        "chunk_id": "5d1c…", "document_id": "01a20920-…", "document_name": "returns.pdf",
        "chunk_index": 3, "text": "Customers may return products within 30 days…",
        "heading": "Returns / Deadlines", "page": 2, "score": 0.0325, "vector_score": 0.71,
        "keyword_score": 8.2, "metadata": {"team": "support"}}], "took_ms": 12.4})

    mode: str
    hits: list[HitRead]
    took_ms: float


class Message(RequestModel):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=20000)]


class ChatRequest(RequestModel):
    model_config = RequestModel.model_config | example({
        "messages": [{"role": "user", "content": "What is the return period?"}],
        "model": "assistant", "top_k": 4, "stream": False})

    messages: Annotated[list[Message], Field(min_length=1, max_length=50)]
    model: ModelName | None = Field(default=None, description="Default: the KB's chat_model")
    top_k: int = Field(default=4, ge=1, le=20)
    min_score: float = Field(default=0.3, ge=-1, le=1, description=(
        "Least cosine similarity of a source: below it the answer says it does not know"))
    filters: Filters = Field(default_factory=dict)
    max_tokens: int = Field(default=256, ge=1, le=4096)
    temperature: float = Field(default=0.2, ge=0, le=2)
    context_tokens: int = Field(default=900, ge=64, le=100_000, description=(
        "About how many tokens of sources go into the prompt"))
    stream: bool = False


class Citation(BaseModel):
    n: int
    chunk_id: str
    document_id: str
    document_name: str
    chunk_index: int
    heading: str
    page: int | None
    score: float
    text: str


class ChatResponse(BaseModel):
    model_config = example({
        "answer": "Customers have 30 days to return a product [1].",
        "citations": [{"n": 1, "chunk_id": "5d1c…", "document_id": "01a20920-…",
                       "document_name": "returns.pdf", "chunk_index": 3,
                       "heading": "Returns", "page": 2, "score": 0.03,
                       "text": "Customers may return products within 30 days…"}],
        "question": "What is the return period?",
        "rewritten_question": "What is the return period?", "known": True,
        "model": "assistant"})

    answer: str
    citations: list[Citation]
    sources: list[Citation] = Field(default_factory=list)
    question: str
    rewritten_question: str
    known: bool
    model: str | None
