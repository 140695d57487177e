"""The `local` runtime: each replica is a worker process of this machine (services.inference.
worker) that loads a built-in model — llama.cpp for chat, sentence-transformers for embeddings —
and speaks the OpenAI API on a local port, so the service's event loop never runs a model."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from services.inference.catalog import BUILTINS
from services.inference.runtimes.base import DeploymentSpec, Replica, stop_process
from workbench.devservers import free_port


class LocalRuntime:
    name = "local"

    def __init__(self, log_dir: Path, *, default_n_ctx: int, threads: int) -> None:
        self.log_dir = log_dir
        self.default_n_ctx = default_n_ctx
        self.threads = threads

    def command(self, spec: DeploymentSpec, port: int) -> list[str]:
        model = BUILTINS[spec.model.removeprefix("builtin:")]
        args = [sys.executable, "-m", "services.inference.worker", "--kind", model.kind,
                "--model", str(model.path()), "--model-name", spec.name,
                "--host", "127.0.0.1", "--port", str(port)]
        if model.kind == "chat":
            n_ctx = int(spec.settings.get("n_ctx") or self.default_n_ctx)
            args += ["--n-ctx", str(n_ctx)]
            threads = int(spec.settings.get("threads") or spec.resources.get("cpu") or
                          self.threads or 0)
            if threads:
                args += ["--threads", str(threads)]
        else:
            for key in ("max_batch", "batch_wait_ms", "max_collect"):
                if spec.settings.get(key):
                    args += [f"--{key.replace('_', '-')}", str(spec.settings[key])]
        return args

    async def launch(self, spec: DeploymentSpec, index: int) -> Replica:
        port = free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{spec.id}-{index}.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")

        def start() -> subprocess.Popen[bytes]:
            with log.open("ab") as out:
                return subprocess.Popen(self.command(spec, port), stdout=out,
                                        stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)

        proc = await asyncio.to_thread(start)
        return Replica(spec.id, index, f"http://127.0.0.1:{port}/v1", proc=proc, log=log)

    async def health(self, replica: Replica, client: httpx.AsyncClient) -> dict[str, Any]:
        code = replica.exited()
        if code is not None:
            raise RuntimeError(f"the worker process exited with code {code}: "
                               f"{replica.log_tail()}")
        r = await client.get(replica.base_url.removesuffix("/v1") + "/health")
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    async def stop(self, replica: Replica) -> None:
        await asyncio.to_thread(stop_process, replica.proc)
