"""What every runtime gives the supervisor: replicas that speak the OpenAI API at a base URL,
started (a process of ours) or attached (a server someone else runs), health-checked, stopped."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx


@dataclass
class DeploymentSpec:
    """What a runtime needs to know about a deployment (a plain copy of the row)."""

    id: str
    org_id: str
    name: str
    kind: str  # chat | embedding
    runtime: str
    replicas: int
    model: str  # builtin:<name> | external:<id>
    settings: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    # For attached endpoints (openai runtime, vllm attach): where and with which key.
    base_url: str | None = None
    api_key: str | None = None
    remote_model: str | None = None
    context_length: int = 2048


@dataclass
class Replica:
    deployment_id: str
    index: int
    base_url: str  # ends with /v1
    api_key: str | None = None
    remote_model: str | None = None
    # starting | ready | failed | stopped
    status: str = "starting"
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    failures: int = 0
    last_error: str = ""
    inflight: int = 0
    queue_depth: int = 0

    @property
    def id(self) -> str:
        return f"{self.deployment_id}/{self.index}"

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def exited(self) -> int | None:
        """The exit code when our process ended; None while it runs (or it is not ours)."""
        return self.proc.poll() if self.proc is not None else None

    def log_tail(self, lines: int = 5) -> str:
        if self.log is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])


class Runtime(Protocol):
    name: str

    async def launch(self, spec: DeploymentSpec, index: int) -> Replica:
        """Start (or attach) replica `index`; returns at once, before it is ready."""

    async def health(self, replica: Replica, client: httpx.AsyncClient) -> dict[str, Any]:
        """Raise if the replica cannot serve; may return details (queue depth)."""

    async def stop(self, replica: Replica) -> None: ...


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
