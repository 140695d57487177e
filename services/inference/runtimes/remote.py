"""Runtimes whose replicas are OpenAI-compatible servers: `openai` attaches to any such server
(an org's registered endpoint, another platform, OpenAI itself); `vllm` starts `vllm serve` with
the deployment's settings on this (GPU) machine, or attaches to a running vLLM server when the
deployment names its `base_url`."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx

from services.inference.runtimes.base import DeploymentSpec, Replica, stop_process
from workbench.devservers import free_port


class OpenAIRuntime:
    name = "openai"

    async def launch(self, spec: DeploymentSpec, index: int) -> Replica:
        if not spec.base_url:
            raise ValueError("the openai runtime needs the model's base_url")
        return Replica(spec.id, index, spec.base_url.rstrip("/"), api_key=spec.api_key,
                       remote_model=spec.remote_model)

    async def health(self, replica: Replica, client: httpx.AsyncClient) -> dict[str, Any]:
        r = await client.get(replica.base_url + "/models", headers=replica.headers())
        r.raise_for_status()
        return {}

    async def stop(self, replica: Replica) -> None:
        return None


class VllmRuntime(OpenAIRuntime):
    """`settings`: `model` (a Hugging Face id or a local path, required unless attaching),
    `base_url` (attach instead of start), `max_model_len`, `gpu_memory_utilization`, `dtype`,
    `extra_args` (list); `resources.gpu_count` becomes `--tensor-parallel-size`."""

    name = "vllm"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir

    def command(self, spec: DeploymentSpec, port: int) -> list[str]:
        binary = shutil.which("vllm")
        if binary is None:
            vllm_serve_args(spec, "127.0.0.1", port)  # a missing model is the first error
            raise RuntimeError("vllm is not installed on this machine (pip install vllm on a "
                               "GPU node), or attach with settings.base_url")
        return [binary, *vllm_serve_args(spec, "127.0.0.1", port)[1:]]

    async def launch(self, spec: DeploymentSpec, index: int) -> Replica:
        if spec.settings.get("base_url"):
            return Replica(spec.id, index, str(spec.settings["base_url"]).rstrip("/"),
                           api_key=spec.settings.get("api_key"),
                           remote_model=spec.settings.get("served_model_name"))
        port = free_port()
        args = self.command(spec, port)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{spec.id}-{index}.log"

        def start() -> subprocess.Popen[bytes]:
            with log.open("ab") as out:
                return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                        env=dict(os.environ), start_new_session=True)

        proc = await asyncio.to_thread(start)
        return Replica(spec.id, index, f"http://127.0.0.1:{port}/v1", proc=proc, log=log,
                       remote_model=spec.name)

    async def health(self, replica: Replica, client: httpx.AsyncClient) -> dict[str, Any]:
        code = replica.exited()
        if code is not None:
            raise RuntimeError(f"vllm exited with code {code}: {replica.log_tail()}")
        if replica.proc is None:
            return await super().health(replica, client)
        r = await client.get(replica.base_url.removesuffix("/v1") + "/health")
        r.raise_for_status()
        return {}

    async def stop(self, replica: Replica) -> None:
        await asyncio.to_thread(stop_process, replica.proc)


def vllm_serve_args(spec: DeploymentSpec, host: str, port: int) -> list[str]:
    """`vllm serve …` with the deployment's settings (here, or in a vLLM image on Kubernetes)."""
    s = spec.settings
    model = s.get("model")
    if not model:
        raise ValueError("a vllm deployment needs settings.model (a model id or path) "
                         "or settings.base_url (a running vLLM server)")
    args = ["vllm", "serve", str(model), "--host", host, "--port", str(port),
            "--served-model-name", spec.name]
    if spec.resources.get("gpu_count"):
        args += ["--tensor-parallel-size", str(int(spec.resources["gpu_count"]))]
    for key in ("max_model_len", "gpu_memory_utilization", "dtype"):
        if s.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(s[key])]
    args += [str(a) for a in s.get("extra_args", [])]
    return args
