"""The `triton` runtime without a Triton server: the generated model repository (config.pbtxt
read back into Triton's ModelConfig, model.py), the tritonserver command line, the clear failure
where tritonserver is missing, the attach modes, a bridge that cannot reach Triton, and Triton
errors turned into OpenAI errors. tests/integration/test_inference_triton.py runs it all against
a real Triton server."""

from __future__ import annotations

import ast
import asyncio
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("tritonclient.http.aio")

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.inference import triton_repo
from services.inference.catalog import BUILTINS
from services.inference.runtimes.base import DeploymentSpec
from services.inference.runtimes.triton import NOT_INSTALLED, TritonRuntime
from services.inference.service import RUNTIMES_FOR
from services.inference.triton_bridge import triton_error
from services.inference.triton_repo import triton_model_name, write_repository

CHAT = "builtin:smollm2-135m-instruct"
EMBEDDING = "builtin:all-minilm-l6-v2"


def spec(**kw: object) -> DeploymentSpec:
    base: dict[str, object] = dict(id="5f0c2a9e-1b2c-4d5e-8f90-0123456789ab", org_id="o1",
                                   name="assistant", kind="chat", runtime="triton", replicas=1,
                                   model=CHAT)
    base.update(kw)
    return DeploymentSpec(**base)  # type: ignore[arg-type]


def read_config(folder: Path) -> mc.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())


def params(config: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def test_chat_repository_is_a_decoupled_python_model(tmp_path: Path) -> None:
    folder = write_repository(tmp_path, spec(settings={"n_ctx": 1024, "threads": 2}),
                              "assistant-5f0c2a9e")
    assert folder == tmp_path / "assistant-5f0c2a9e"
    config = read_config(folder)
    assert (config.name, config.backend, config.max_batch_size) == (
        "assistant-5f0c2a9e", "python", 0)
    assert config.model_transaction_policy.decoupled is True
    inputs = {i.name: (i.data_type, list(i.dims), i.optional) for i in config.input}
    assert inputs == {"messages": (mc.TYPE_STRING, [1], True),
                      "text_input": (mc.TYPE_STRING, [1], True),
                      "input_ids": (mc.TYPE_INT32, [-1], True),
                      "sampling_parameters": (mc.TYPE_STRING, [1], True),
                      "stream": (mc.TYPE_BOOL, [1], True)}
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config.output}
    assert outputs == {"text_output": (mc.TYPE_STRING, [1]),
                       "finish_reason": (mc.TYPE_STRING, [1]),
                       "prompt_tokens": (mc.TYPE_INT32, [1]),
                       "completion_tokens": (mc.TYPE_INT32, [1])}
    [group] = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_CPU, 1, [])
    assert params(config) == {
        "kind": "chat", "model_path": str(BUILTINS["smollm2-135m-instruct"].path()),
        "served_model_name": "assistant", "python_path": str(triton_repo.PROJECT_ROOT),
        "threads": "2", "n_ctx": "1024", "repack": "false"}
    assert not config.HasField("dynamic_batching")
    # The model is the worker-engine model of services/inference/triton_model.py.
    model_py = (folder / "1" / "model.py").read_text()
    assert model_py == triton_repo.MODEL_SOURCE.read_text()
    tree = ast.parse(model_py)
    [model] = [n for n in tree.body if isinstance(n, ast.ClassDef) and
               n.name == "TritonPythonModel"]
    assert {f.name for f in model.body if isinstance(f, ast.FunctionDef)} == {
        "initialize", "execute", "finalize"}
    assert not list(folder.rglob("*.tmp"))


def test_embedding_repository_batches_dynamically(tmp_path: Path) -> None:
    s = spec(name="vectors", kind="embedding", model=EMBEDDING,
             settings={"max_batch": 32, "batch_wait_ms": 3}, resources={"cpu": 4})
    config = read_config(write_repository(tmp_path, s, "vectors", execution_env="/opt/env"))
    assert config.max_batch_size == 32
    assert config.dynamic_batching.max_queue_delay_microseconds == 3000
    assert not config.model_transaction_policy.decoupled
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("text_input", mc.TYPE_STRING, [1], False)]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("embedding", mc.TYPE_FP32, [384]), ("token_count", mc.TYPE_INT32, [1])]
    p = params(config)
    assert p["kind"] == "embedding" and p["model_path"] == str(BUILTINS["all-minilm-l6-v2"].path())
    assert (p["max_batch"], p["context_length"], p["threads"]) == ("32", "256", "4")
    assert p["EXECUTION_ENV_PATH"] == "/opt/env"


def test_gpu_count_places_the_instances_on_gpus(tmp_path: Path) -> None:
    s = spec(resources={"gpu_count": 2},
             settings={"instances": 3, "execution_env": "/envs/wb", "python_path": "/srv/wb"})
    config = read_config(write_repository(tmp_path, s, "m", execution_env="/default/env"))
    [group] = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (
        mc.ModelInstanceGroup.KIND_GPU, 3, [0, 1])
    assert params(config)["EXECUTION_ENV_PATH"] == "/envs/wb"
    assert params(config)["python_path"] == "/srv/wb"


def test_model_names_are_folder_names_unique_per_deployment() -> None:
    assert triton_model_name(spec(name="support bot/v2")) == "support-bot-v2-5f0c2a9e"
    assert triton_model_name(spec(settings={"triton_model": "llm"})) == "llm"


def test_only_builtin_models_get_a_repository(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="built-in models"):
        write_repository(tmp_path, spec(model="external:3f1e"), "m")


def test_builtin_models_can_run_on_triton() -> None:
    assert RUNTIMES_FOR["builtin"][0] == "local" and "triton" in RUNTIMES_FOR["builtin"]


def test_tritonserver_command_line(tmp_path: Path) -> None:
    rt = TritonRuntime(tmp_path, tmp_path / "repos", backend_directory="/opt/tt/backends")
    cmd = rt.server_command("/opt/tritonserver/bin/tritonserver", tmp_path / "repos" / "d1",
                            8123, spec(settings={"extra_args": ["--log-verbose", 1]}))
    assert cmd == ["/opt/tritonserver/bin/tritonserver",
                   "--model-repository", str(tmp_path / "repos" / "d1"),
                   "--model-control-mode", "explicit", "--http-address", "127.0.0.1",
                   "--http-port", "8123", "--allow-grpc", "false", "--allow-metrics", "false",
                   "--exit-timeout-secs", "10", "--backend-directory", "/opt/tt/backends",
                   "--log-verbose", "1"]
    bridge = rt.bridge_command(spec(), "http://10.0.0.5:8000", "assistant-5f0c2a9e", 9001,
                               load=True)
    assert bridge[:3] == [sys.executable, "-m", "services.inference.triton_bridge"]
    assert bridge[bridge.index("--triton-url") + 1] == "http://10.0.0.5:8000"
    assert bridge[bridge.index("--triton-model") + 1] == "assistant-5f0c2a9e"
    assert bridge[bridge.index("--model-name") + 1] == "assistant"
    assert bridge[bridge.index("--kind") + 1] == "chat" and bridge[-1] == "--load"


async def test_without_tritonserver_the_launch_fails_with_a_clear_reason(tmp_path: Path) -> None:
    rt = TritonRuntime(tmp_path, tmp_path / "repos", server="tritonserver-not-on-this-machine")
    with pytest.raises(RuntimeError) as err:
        await rt.launch(spec(), 0)
    assert str(err.value) == NOT_INSTALLED
    assert NOT_INSTALLED == ("tritonserver is not installed on this machine; attach with "
                             "settings.url")
    assert not (tmp_path / "repos").exists()


async def test_attach_needs_a_repository_or_a_model(tmp_path: Path) -> None:
    rt = TritonRuntime(tmp_path, tmp_path / "repos")
    with pytest.raises(ValueError, match=r"settings\.model_repository .* settings\.triton_model"):
        await rt.launch(spec(settings={"url": "http://triton:8000"}), 0)


async def test_attached_bridge_reports_an_unreachable_triton(tmp_path: Path) -> None:
    """The repository is written where the server would read it; the bridge (a real process)
    answers its health check 503 with the reason, which the runtime raises."""
    rt = TritonRuntime(tmp_path / "logs", tmp_path / "repos")
    shared = tmp_path / "server-repository"
    replica = await rt.launch(spec(settings={"url": "http://127.0.0.1:9/",
                                             "model_repository": str(shared)}), 0)
    try:
        assert read_config(shared / "assistant-5f0c2a9e").name == "assistant-5f0c2a9e"
        reason = ""
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(120):
                try:
                    await rt.health(replica, client)
                except httpx.TransportError:  # the bridge is still starting
                    pass
                except RuntimeError as exc:
                    reason = str(exc)
                    if "127.0.0.1:9" in reason:
                        break
                await asyncio.sleep(0.25)
        assert reason.startswith("Triton at http://127.0.0.1:9 ('assistant-5f0c2a9e'):"), reason
        assert replica.exited() is None
    finally:
        await rt.stop(replica)
    assert replica.exited() is not None


def test_model_errors_pass_as_openai_errors_and_others_as_server_errors() -> None:
    err = triton_error('{"error": {"message": "This model\'s maximum context length is 1024 '
                       'tokens.", "type": "invalid_request_error", "param": "messages", '
                       '"code": "context_length_exceeded"}, "status": 400}', 400)
    assert (err.status, err.param, err.code, err.type) == (
        400, "messages", "context_length_exceeded", "invalid_request_error")
    assert err.message.startswith("This model's maximum context length is 1024")
    other = triton_error("Request for unknown model: 'x' is not found", 400)
    assert (other.status, other.code, other.type) == (502, "triton_error", "server_error")
    assert other.message == "triton: Request for unknown model: 'x' is not found"
    assert triton_error("Stub process is not healthy.", 500).status == 500
