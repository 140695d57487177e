"""The `triton` runtime: a built-in model served by NVIDIA Triton Inference Server's Python
backend from a generated model repository (services/inference/triton_repo.py). Each replica is a
bridge process (services.inference.triton_bridge) that speaks the OpenAI API and calls Triton.

`settings.url` attaches to a running server (model control mode explicit): the repository is
written where that server reads it (`settings.model_repository`) and the model loaded, or a
model it already has is used (`settings.triton_model`). Without a url each replica starts its
own `tritonserver` on this machine, which needs the binary (NVIDIA's container has it)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from services.inference.catalog import BUILTINS
from services.inference.runtimes.base import DeploymentSpec, Replica, stop_process
from services.inference.triton_repo import triton_model_name, write_repository
from workbench.devservers import free_port

log = logging.getLogger("wb.inference.triton")

NOT_INSTALLED = "tritonserver is not installed on this machine; attach with settings.url"


def _tail(path: Path, lines: int = 5) -> str:
    if not path.exists():
        return ""
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


class TritonRuntime:
    """`settings`: `url` (attach), `model_repository` (with url: the server's repository folder,
    written to), `triton_model` (the model's name on Triton), `execution_env` (the Python
    backend's EXECUTION_ENV_PATH), `python_path`, `instances`, `n_ctx`, `threads`, `max_batch`,
    `batch_wait_ms`, `extra_args` (tritonserver); `resources.gpu_count` → KIND_GPU instances."""

    name = "triton"

    def __init__(self, log_dir: Path, repo_root: Path, *, server: str = "tritonserver",
                 backend_directory: str = "", execution_env: str = "", default_n_ctx: int = 2048,
                 threads: int = 0, request_timeout: float = 600.0) -> None:
        self.log_dir, self.repo_root = log_dir, repo_root
        self.server, self.backend_directory = server, backend_directory
        self.execution_env = execution_env
        self.default_n_ctx, self.threads, self.request_timeout = (
            default_n_ctx, threads, request_timeout)
        self._servers: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        # Models this runtime loaded on an attached server: (url, model) → replica ids.
        self._loaded: dict[tuple[str, str], set[str]] = {}
        self._loaded_by: dict[str, tuple[str, str]] = {}

    def server_binary(self) -> str:
        found = shutil.which(self.server)
        if found is None:
            raise RuntimeError(NOT_INSTALLED)
        return found

    def server_command(self, binary: str, repo: Path, port: int,
                       spec: DeploymentSpec) -> list[str]:
        args = [binary, "--model-repository", str(repo), "--model-control-mode", "explicit",
                "--http-address", "127.0.0.1", "--http-port", str(port),
                "--allow-grpc", "false", "--allow-metrics", "false", "--exit-timeout-secs", "10"]
        if self.backend_directory:
            args += ["--backend-directory", self.backend_directory]
        return args + [str(a) for a in spec.settings.get("extra_args", [])]

    def bridge_command(self, spec: DeploymentSpec, url: str, model: str, port: int,
                       load: bool) -> list[str]:
        builtin = BUILTINS[spec.model.removeprefix("builtin:")]
        return [sys.executable, "-m", "services.inference.triton_bridge", "--kind", builtin.kind,
                "--triton-url", url, "--triton-model", model, "--model-name", spec.name,
                "--model-file", str(builtin.path()), "--host", "127.0.0.1", "--port", str(port),
                "--timeout", str(self.request_timeout)] + (["--load"] if load else [])

    def _repo_args(self) -> dict[str, Any]:
        return {"default_n_ctx": self.default_n_ctx, "default_threads": self.threads,
                "execution_env": self.execution_env}

    async def _start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")

        def start() -> subprocess.Popen[bytes]:
            with log.open("ab") as out:
                return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)

        return await asyncio.to_thread(start)

    async def launch(self, spec: DeploymentSpec, index: int) -> Replica:
        if spec.model.removeprefix("builtin:") not in BUILTINS:
            raise ValueError(f"the triton runtime serves the built-in models, not {spec.model!r}")
        s, model = spec.settings, triton_model_name(spec)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        server: tuple[subprocess.Popen[bytes], Path] | None = None
        if s.get("url"):
            url = str(s["url"]).rstrip("/")
            if s.get("model_repository"):
                await asyncio.to_thread(write_repository, Path(str(s["model_repository"])),
                                        spec, model, **self._repo_args())
            elif not s.get("triton_model"):
                raise ValueError("attaching to Triton (settings.url) needs "
                                 "settings.model_repository (the folder the server reads its "
                                 "models from: this model is written there and loaded) or "
                                 "settings.triton_model (a model the server already has)")
        else:
            binary = self.server_binary()
            repo = self.repo_root / spec.id
            await asyncio.to_thread(write_repository, repo, spec, model, **self._repo_args())
            port = free_port()
            server_log = self.log_dir / f"{spec.id}-{index}-tritonserver.log"
            server = (await self._start(self.server_command(binary, repo, port, spec),
                                        server_log), server_log)
            url = f"http://127.0.0.1:{port}"
        port = free_port()
        log_path = self.log_dir / f"{spec.id}-{index}.log"
        try:
            bridge = await self._start(self.bridge_command(spec, url, model, port, load=True),
                                       log_path)
        except BaseException:
            if server is not None:
                await asyncio.to_thread(stop_process, server[0])
            raise
        replica = Replica(spec.id, index, f"http://127.0.0.1:{port}/v1", proc=bridge,
                          log=log_path)
        if server is not None:
            self._servers[replica.id] = server
        elif s.get("model_repository"):
            self._loaded.setdefault((url, model), set()).add(replica.id)
            self._loaded_by[replica.id] = (url, model)
        return replica

    async def health(self, replica: Replica, client: httpx.AsyncClient) -> dict[str, Any]:
        server = self._servers.get(replica.id)
        if server is not None and (code := server[0].poll()) is not None:
            # The pair fails as one: the supervisor sees the bridge gone and replaces both.
            await asyncio.to_thread(stop_process, replica.proc)
            raise RuntimeError(f"tritonserver exited with code {code}: {_tail(server[1])}")
        code = replica.exited()
        if code is not None:
            raise RuntimeError(f"the triton bridge exited with code {code}: "
                               f"{replica.log_tail()}")
        r = await client.get(replica.base_url.removesuffix("/v1") + "/health")
        if r.status_code != 200:
            try:
                reason = str(r.json()["error"]["message"])
            except (ValueError, KeyError, TypeError):
                reason = f"HTTP {r.status_code}: {r.text[:200]}"
            raise RuntimeError(reason)
        body: dict[str, Any] = r.json()
        return body

    async def stop(self, replica: Replica) -> None:
        await asyncio.to_thread(stop_process, replica.proc)
        server = self._servers.pop(replica.id, None)
        if server is not None:
            await asyncio.to_thread(stop_process, server[0], 20.0)
        key = self._loaded_by.pop(replica.id, None)
        if key is not None:
            users = self._loaded.get(key, set())
            users.discard(replica.id)
            if not users:  # the last replica that loaded it: free the server's memory
                self._loaded.pop(key, None)
                await self._unload(*key)

    async def _unload(self, url: str, model: str) -> None:
        from tritonclient.http.aio import InferenceServerClient

        netloc = url.split("://", 1)[-1]
        client = InferenceServerClient(netloc, ssl=url.startswith("https://"), conn_timeout=30)
        try:
            await client.unload_model(model)
        except Exception as exc:  # the server may be gone: nothing left to free
            log.warning("unloading model %r from Triton at %s failed: %s", model, url, exc)
        finally:
            await client.close()
