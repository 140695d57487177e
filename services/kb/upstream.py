"""What the kb service asks other services: the user service whether a project is the org's; the
inference service for embeddings and answers, on behalf of the org (its internal routes: the
same quota, safety rules and metering as the public API); the data service for the files of
dataset versions."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import orjson

from workbench.client import ServiceClient, raise_for_problem
from workbench.errors import (
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    ValidationFailed,
    WorkbenchError,
)


class ModelError(WorkbenchError):
    """The inference service refused or failed a call (its OpenAI-style message is kept)."""

    status = 502
    code = "model_error"


def _openai_error(resp: httpx.Response, model: str) -> WorkbenchError:
    try:
        err = orjson.loads(resp.content).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        err = {}
    message = err.get("message") or resp.text[:300] or f"HTTP {resp.status_code}"
    if resp.status_code == 404:
        return ValidationFailed(f"model {model!r} is not served in this organization: "
                                f"{message}", code="model_not_found")
    if resp.status_code in (503, 502, 504):
        return ServiceUnavailable(f"model {model!r} cannot answer now: {message}",
                                  code="model_unavailable")
    if resp.status_code == 429:
        return ModelError(f"model {model!r}: {message}", code="quota_exceeded")
    exc = ModelError(f"model {model!r}: {message}", code=str(err.get("code") or "model_error"))
    exc.status = 400 if 400 <= resp.status_code < 500 else 502
    return exc


class Upstream:
    def __init__(self, user: ServiceClient, inference: httpx.AsyncClient,
                 data: ServiceClient) -> None:
        self.user = user
        self.inference = inference
        self.data = data

    async def check_project(self, org_id: uuid.UUID, project_id: uuid.UUID) -> None:
        resp = await self.user.get(f"/internal/v1/orgs/{org_id}/projects/{project_id}")
        if resp.status_code == 404:
            raise NotFound(f"project {project_id} does not exist",
                           extra={"field": "project_id"})
        raise_for_problem(resp)

    @staticmethod
    def _headers(user_id: uuid.UUID | None) -> dict[str, str]:
        return {"x-wb-on-behalf-of": str(user_id)} if user_id else {}

    async def embed(self, org_id: uuid.UUID, user_id: uuid.UUID | None, model: str,
                    texts: list[str]) -> list[list[float]]:
        try:
            resp = await self.inference.post(
                f"/internal/v1/orgs/{org_id}/embeddings", headers=self._headers(user_id),
                json={"model": model, "input": texts, "encoding_format": "base64"})
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the inference service cannot be reached: {exc}",
                                     code="inference_unavailable") from exc
        if resp.status_code >= 400:
            raise _openai_error(resp, model)
        data = orjson.loads(resp.content)["data"]
        # base64 float32 (as the openai client asks): a quarter of the bytes of JSON floats
        return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist()
                if isinstance(d["embedding"], str) else d["embedding"]
                for d in sorted(data, key=lambda d: d["index"])]

    async def chat(self, org_id: uuid.UUID, user_id: uuid.UUID | None, model: str,
                   messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        try:
            resp = await self.inference.post(
                f"/internal/v1/orgs/{org_id}/chat/completions", headers=self._headers(user_id),
                json={"model": model, "messages": messages, **params})
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the inference service cannot be reached: {exc}",
                                     code="inference_unavailable") from exc
        if resp.status_code >= 400:
            raise _openai_error(resp, model)
        body: dict[str, Any] = orjson.loads(resp.content)
        return body

    async def chat_stream(self, org_id: uuid.UUID, user_id: uuid.UUID | None, model: str,
                          messages: list[dict[str, str]], **params: Any
                          ) -> AsyncIterator[str]:
        """The answer's text as it is generated."""
        try:
            async with self.inference.stream(
                    "POST", f"/internal/v1/orgs/{org_id}/chat/completions",
                    headers=self._headers(user_id),
                    json={"model": model, "messages": messages, "stream": True,
                          **params}) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _openai_error(resp, model)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = orjson.loads(data)
                    if "error" in chunk:
                        raise ModelError(f"model {model!r}: {chunk['error'].get('message')}")
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the inference service failed while answering: {exc}",
                                     code="inference_unavailable") from exc

    async def dataset_file(self, org_id: uuid.UUID, dataset_id: uuid.UUID,
                           version: int | None, max_bytes: int, *,
                           unless_sha256: str | None = None
                           ) -> tuple[dict[str, Any], bytes | None]:
        """The version's metadata (number, filename, sha256, format) and its bytes (decrypted by
        the data service); `version` None: the latest. None for the bytes when the version's
        checksum is `unless_sha256` (nothing changed: nothing is downloaded)."""
        which = "latest" if version is None else str(version)
        base = f"/internal/v1/orgs/{org_id}/datasets/{dataset_id}/versions/{which}"
        meta = await self.data.get(base)
        if meta.status_code == 404:
            raise NotFound(f"dataset {dataset_id} version {which} does not exist",
                           extra={"field": "dataset_id"})
        raise_for_problem(meta)
        info: dict[str, Any] = meta.json()
        if int(info["size_bytes"]) > max_bytes:
            raise PayloadTooLarge(f"dataset version is {int(info['size_bytes']):,} bytes; "
                                  f"documents may have at most {max_bytes:,}",
                                  code="document_too_large")
        if unless_sha256 is not None and info.get("sha256") == unless_sha256:
            return info, None
        # The number just read, not "latest" again: a version added meanwhile waits its turn.
        resp = await self.data.get(f"/internal/v1/orgs/{org_id}/datasets/{dataset_id}/versions/"
                                   f"{info['number']}/content")
        raise_for_problem(resp)
        return info, resp.content
