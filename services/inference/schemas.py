"""Request and response models of the inference management API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, StringConstraints

from workbench.schemas import PartialUpdate, RequestModel, example

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]



class ModelRegister(RequestModel):
    model_config = RequestModel.model_config | example({
        "name": "gpt-4o-mini", "kind": "chat", "base_url": "https://api.openai.com/v1",
        "remote_model": "gpt-4o-mini", "api_key": "sk-…", "context_length": 128000})

    name: Name
    kind: Literal["chat", "embedding"]
    base_url: HttpUrl = Field(description="The OpenAI-compatible API root, usually …/v1")
    remote_model: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    api_key: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = Field(
        default=None, description="Stored encrypted, never returned")
    context_length: int = Field(default=4096, ge=128, le=10_000_000)
    description: Annotated[str, StringConstraints(max_length=2000)] = ""


class ModelRead(BaseModel):
    model_config = example({
        "id": "builtin:smollm2-135m-instruct", "name": "smollm2-135m-instruct",
        "kind": "chat", "source": "builtin", "description": "SmolLM2 135M Instruct",
        "context_length": 8192, "dimensions": None, "runtimes": ["local"], "base_url": None,
        "remote_model": None, "has_api_key": False})

    id: str
    name: str
    kind: str
    source: str
    description: str
    context_length: int
    dimensions: int | None = None
    runtimes: list[str]
    base_url: str | None = None
    remote_model: str | None = None
    has_api_key: bool


class Resources(RequestModel):
    cpu: int | None = Field(default=None, ge=1, le=256, description="CPU threads per replica")
    memory_mb: int | None = Field(default=None, ge=64)
    gpu_type: Annotated[str, StringConstraints(max_length=50)] | None = None
    gpu_count: int | None = Field(default=None, ge=0, le=64)
    node_selector: dict[str, str] | None = Field(default=None, description=(
        "Kubernetes placement: labels the nodes must have"))
    tolerations: Annotated[list[dict[str, Any]], Field(max_length=20)] | None = Field(
        default=None, description="Kubernetes placement: tolerations of the pods "
                                  "(key, operator, value, effect)")


class DeploymentCreate(RequestModel):
    model_config = RequestModel.model_config | example({
        "name": "assistant", "model": "builtin:smollm2-135m-instruct", "runtime": "local",
        "replicas": 2, "resources": {"cpu": 2}, "settings": {"n_ctx": 2048},
        "description": "support assistant"})

    name: Name
    model: Annotated[str, StringConstraints(min_length=3, max_length=300)] = Field(
        description="`builtin:<name>` or `external:<id>` from GET /api/v1/inference/models")
    model_version: Annotated[str, StringConstraints(max_length=50)] = ""
    runtime: Literal["local", "openai", "vllm", "rayserve", "triton"] | None = Field(
        default=None, description="Default: local for built-in models, openai for external")
    replicas: int = Field(default=1, ge=1, le=16)
    resources: Resources = Field(default_factory=Resources)
    settings: dict[str, Any] = Field(default_factory=dict, description=(
        "local: n_ctx, threads, max_batch, batch_wait_ms; vllm: model, base_url, "
        "max_model_len, gpu_memory_utilization, dtype, extra_args"))
    description: Annotated[str, StringConstraints(max_length=2000)] = ""



class DeploymentUpdate(PartialUpdate):
    model_config = RequestModel.model_config | example({"description": "support assistant v2"})
    _not_null = ("name", "description")

    name: Name | None = None
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None


class ScaleRequest(RequestModel):
    model_config = RequestModel.model_config | example({"replicas": 3})

    replicas: int = Field(ge=1, le=16)


class ReplicaRead(BaseModel):
    index: int
    status: str
    restarts: int
    inflight: int
    queue_depth: int
    last_error: str


class DeploymentRead(BaseModel):
    model_config = ConfigDict(from_attributes=True) | example({
        "id": "01a20900-…", "name": "assistant", "model": "builtin:smollm2-135m-instruct",
        "model_version": "", "kind": "chat", "runtime": "local", "replicas": 2,
        "resources": {"cpu": 2}, "settings": {"n_ctx": 2048}, "status": "running",
        "reason": "", "description": "", "created_by": "user:01a2…",
        "created_at": "2026-11-23T12:00:00Z", "updated_at": "2026-11-23T12:00:30Z",
        "started_at": "2026-11-23T12:00:05Z",
        "replica_status": [{"index": 0, "status": "ready", "restarts": 0, "inflight": 1,
                            "queue_depth": 0, "last_error": ""}]})

    id: uuid.UUID
    name: str
    model: str
    model_version: str
    kind: str
    runtime: str
    replicas: int
    resources: dict[str, Any]
    settings: dict[str, Any]
    status: str
    reason: str
    description: str
    created_by: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    replica_status: list[ReplicaRead] = Field(default_factory=list)


class Percentiles(BaseModel):
    p50: float | None
    p95: float | None
    p99: float | None


class MetricsRead(BaseModel):
    model_config = example({
        "requests": 1000, "errors": 2, "error_rate": 0.002, "prompt_tokens": 52000,
        "completion_tokens": 31000, "latency_ms": {"p50": 420.0, "p95": 900.0, "p99": 1300.0},
        "time_to_first_token_ms": {"p50": 35.0, "p95": 80.0, "p99": 120.0},
        "tokens_per_s": 95.5, "queue_depth": 1, "window": 1000,
        "by_route": {"assistant": {"requests": 900, "errors": 1}}})

    requests: int
    errors: int
    error_rate: float
    prompt_tokens: int
    completion_tokens: int
    latency_ms: Percentiles
    time_to_first_token_ms: Percentiles
    tokens_per_s: float | None
    queue_depth: int
    window: int
    by_route: dict[str, dict[str, int]]


class Arm(RequestModel):
    deployment_id: uuid.UUID
    weight: int = Field(ge=0, le=1000)


class RouteCreate(RequestModel):
    model_config = RequestModel.model_config | example({
        "name": "assistant-ab", "arms": [{"deployment_id": "01a20900-…", "weight": 90},
                                         {"deployment_id": "01a20901-…", "weight": 10}]})

    name: Name
    arms: Annotated[list[Arm], Field(min_length=1, max_length=10)]


class RouteUpdate(RequestModel):
    model_config = RequestModel.model_config | example({
        "arms": [{"deployment_id": "01a20900-…", "weight": 50},
                 {"deployment_id": "01a20901-…", "weight": 50}]})

    arms: Annotated[list[Arm], Field(min_length=1, max_length=10)]


class RouteRead(BaseModel):
    model_config = ConfigDict(from_attributes=True) | example({
        "id": "01a20910-…", "name": "assistant-ab",
        "arms": [{"deployment_id": "01a20900-…", "weight": 90}],
        "created_by": "user:01a2…", "created_at": "2026-11-23T12:00:00Z",
        "updated_at": "2026-11-23T12:00:00Z"})

    id: uuid.UUID
    name: str
    arms: list[dict[str, Any]]
    created_by: str
    created_at: datetime
    updated_at: datetime


class RuleCreate(RequestModel):
    model_config = RequestModel.model_config | example({
        "name": "no card numbers out", "stage": "output", "kind": "pii",
        "patterns": ["bank_card", "cn_resident_id"], "action": "redact"})

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    stage: Literal["input", "output", "both"]
    kind: Literal["keywords", "regex", "pii"]
    patterns: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=500)]],
                        Field(min_length=1, max_length=200)]
    action: Literal["block", "redact"]
    replacement: Annotated[str, StringConstraints(max_length=100)] = "[REDACTED]"
    enabled: bool = True


class RuleUpdate(PartialUpdate):
    model_config = RequestModel.model_config | example({"enabled": False})
    _not_null = ("name", "stage", "kind", "patterns", "action", "replacement", "enabled")

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    stage: Literal["input", "output", "both"] | None = None
    kind: Literal["keywords", "regex", "pii"] | None = None
    patterns: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=500)]],
                        Field(min_length=1, max_length=200)] | None = None
    action: Literal["block", "redact"] | None = None
    replacement: Annotated[str, StringConstraints(max_length=100)] | None = None
    enabled: bool | None = None


class RuleRead(BaseModel):
    model_config = ConfigDict(from_attributes=True) | example({
        "id": "01a20920-…", "name": "no card numbers out", "stage": "output", "kind": "pii",
        "patterns": ["bank_card"], "action": "redact", "replacement": "[REDACTED]",
        "enabled": True, "created_by": "user:01a2…", "created_at": "2026-11-23T12:00:00Z",
        "updated_at": "2026-11-23T12:00:00Z"})

    id: uuid.UUID
    name: str
    stage: str
    kind: str
    patterns: list[str]
    action: str
    replacement: str
    enabled: bool
    created_by: str
    created_at: datetime
    updated_at: datetime
