"""How runtimes turn a deployment into a replica: the worker command of the local runtime, the
`vllm serve` command (or an attach) of the vllm runtime, the endpoint of the openai runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from services.inference.runtimes import remote
from services.inference.runtimes.base import DeploymentSpec
from services.inference.runtimes.local import LocalRuntime
from services.inference.runtimes.remote import OpenAIRuntime, VllmRuntime


def spec(**kw: object) -> DeploymentSpec:
    base: dict[str, object] = dict(id="d1", org_id="o1", name="assistant", kind="chat",
                                   runtime="local", replicas=1,
                                   model="builtin:smollm2-135m-instruct")
    base.update(kw)
    return DeploymentSpec(**base)  # type: ignore[arg-type]


def test_local_chat_worker_command(tmp_path: Path) -> None:
    rt = LocalRuntime(tmp_path, default_n_ctx=2048, threads=0)
    cmd = rt.command(spec(settings={"n_ctx": 1024, "threads": 2}), 4000)
    assert cmd[:3] == [sys.executable, "-m", "services.inference.worker"]
    assert cmd[cmd.index("--kind") + 1] == "chat"
    assert cmd[cmd.index("--model") + 1].endswith(".gguf")
    assert cmd[cmd.index("--model-name") + 1] == "assistant"
    assert cmd[cmd.index("--n-ctx") + 1] == "1024"
    assert cmd[cmd.index("--threads") + 1] == "2"
    assert cmd[cmd.index("--port") + 1] == "4000"
    default = rt.command(spec(), 4001)
    assert default[default.index("--n-ctx") + 1] == "2048" and "--threads" not in default


def test_local_embedding_worker_command(tmp_path: Path) -> None:
    rt = LocalRuntime(tmp_path, default_n_ctx=2048, threads=0)
    cmd = rt.command(spec(kind="embedding", model="builtin:all-minilm-l6-v2",
                          settings={"max_batch": 32, "batch_wait_ms": 3}), 4002)
    assert cmd[cmd.index("--kind") + 1] == "embedding"
    assert cmd[cmd.index("--max-batch") + 1] == "32"
    assert cmd[cmd.index("--batch-wait-ms") + 1] == "3"
    assert "--n-ctx" not in cmd


def test_vllm_serve_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote.shutil, "which", lambda _: "/opt/vllm/bin/vllm")
    rt = VllmRuntime(tmp_path)
    cmd = rt.command(spec(runtime="vllm", resources={"gpu_count": 2}, settings={
        "model": "Qwen/Qwen2.5-7B-Instruct", "max_model_len": 8192,
        "gpu_memory_utilization": 0.85, "extra_args": ["--enforce-eager"]}), 8100)
    assert cmd[:3] == ["/opt/vllm/bin/vllm", "serve", "Qwen/Qwen2.5-7B-Instruct"]
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--max-model-len") + 1] == "8192"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.85"
    assert cmd[cmd.index("--served-model-name") + 1] == "assistant"
    assert cmd[-1] == "--enforce-eager"


def test_vllm_needs_a_model_and_the_binary(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    rt = VllmRuntime(tmp_path)
    with pytest.raises(ValueError, match=r"settings\.model"):
        rt.command(spec(runtime="vllm"), 1)
    monkeypatch.setattr(remote.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="vllm is not installed"):
        rt.command(spec(runtime="vllm", settings={"model": "m"}), 1)


async def test_vllm_attach_and_openai_endpoint(tmp_path: Path) -> None:
    attached = await VllmRuntime(tmp_path).launch(spec(runtime="vllm", settings={
        "base_url": "http://gpu-node:8000/v1/", "served_model_name": "qwen"}), 0)
    assert (attached.base_url, attached.remote_model, attached.proc) == (
        "http://gpu-node:8000/v1", "qwen", None)
    remote_replica = await OpenAIRuntime().launch(spec(
        runtime="openai", base_url="https://api.example.com/v1/", api_key="sk-1",
        remote_model="gpt-x"), 0)
    assert remote_replica.base_url == "https://api.example.com/v1"
    assert remote_replica.headers() == {"authorization": "Bearer sk-1"}
    with pytest.raises(ValueError):
        await OpenAIRuntime().launch(spec(runtime="openai"), 0)
