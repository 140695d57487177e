"""The Triton model repository of a `triton` deployment of a built-in model:
`<repository>/<model>/config.pbtxt`, built as a `ModelConfig` message and written with
protobuf's text format (so it is valid by construction), and `<repository>/<model>/1/model.py`,
a copy of services/inference/triton_model.py (the Python-backend model around the worker's
engines).

The model's interface follows Triton's LLM backends: chat is a decoupled model taking
`messages` (the OpenAI messages as JSON) or `text_input` / `input_ids` (a completion prompt),
`sampling_parameters` (JSON: the OpenAI request's sampling fields) and `stream`, answering
`text_output`, `finish_reason`, `prompt_tokens`, `completion_tokens`; embeddings take
`text_input` (one text per batch row) and answer `embedding` and `token_count`, batched
dynamically by Triton."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.inference.catalog import BUILTINS
from services.inference.runtimes.base import DeploymentSpec

MODEL_SOURCE = Path(__file__).with_name("triton_model.py")
# Where `services` can be imported from: the generated models put it on their sys.path.
PROJECT_ROOT = Path(__file__).resolve().parents[2]

# (name, data type, dims, optional)
CHAT_INPUTS = (("messages", mc.TYPE_STRING, [1], True), ("text_input", mc.TYPE_STRING, [1], True),
               ("input_ids", mc.TYPE_INT32, [-1], True),
               ("sampling_parameters", mc.TYPE_STRING, [1], True),
               ("stream", mc.TYPE_BOOL, [1], True))
CHAT_OUTPUTS = (("text_output", mc.TYPE_STRING, [1]), ("finish_reason", mc.TYPE_STRING, [1]),
                ("prompt_tokens", mc.TYPE_INT32, [1]), ("completion_tokens", mc.TYPE_INT32, [1]))
EMBEDDING_INPUTS = (("text_input", mc.TYPE_STRING, [1], False),)
DEFAULT_MAX_BATCH = 64
DEFAULT_BATCH_WAIT_MS = 5.0


def triton_model_name(spec: DeploymentSpec) -> str:
    """`settings.triton_model`, else the deployment's name and id: unique on a server that
    several orgs' deployments share, and a valid folder name."""
    if spec.settings.get("triton_model"):
        return str(spec.settings["triton_model"])
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name).strip("-.") or "model"
    return f"{slug}-{spec.id.replace('-', '')[:8]}"


def model_config(spec: DeploymentSpec, name: str, *, default_n_ctx: int = 2048,
                 default_threads: int = 0, python_path: str | None = None,
                 execution_env: str = "") -> mc.ModelConfig:
    """The ModelConfig of a built-in model's deployment. `settings`: `n_ctx`, `threads`,
    `max_batch`, `batch_wait_ms`, `instances` (per device), `execution_env`, `python_path`;
    `resources.gpu_count` > 0 places the instances on that many GPUs (KIND_GPU)."""
    ref = spec.model.removeprefix("builtin:")
    if not spec.model.startswith("builtin:") or ref not in BUILTINS:
        raise ValueError(f"the triton runtime serves the built-in models, not {spec.model!r}")
    builtin, s = BUILTINS[ref], spec.settings
    config = mc.ModelConfig(name=name, backend="python")
    params: dict[str, Any] = {
        "kind": builtin.kind, "model_path": builtin.path(), "served_model_name": spec.name,
        "python_path": s.get("python_path") or python_path or PROJECT_ROOT,
        "threads": int(s.get("threads") or spec.resources.get("cpu") or default_threads or 0)}
    if builtin.kind == "chat":
        config.max_batch_size = 0  # one generation per request; Triton queues the others
        config.model_transaction_policy.decoupled = True
        for in_name, dtype, dims, optional in CHAT_INPUTS:
            config.input.add(name=in_name, data_type=dtype, dims=dims, optional=optional)
        for out_name, dtype, dims in CHAT_OUTPUTS:
            config.output.add(name=out_name, data_type=dtype, dims=dims)
        params |= {"n_ctx": int(s.get("n_ctx") or default_n_ctx),
                   "repack": "true" if s.get("repack") else "false"}
    else:
        max_batch = int(s.get("max_batch") or DEFAULT_MAX_BATCH)
        wait_ms = float(s.get("batch_wait_ms") or DEFAULT_BATCH_WAIT_MS)
        config.max_batch_size = max_batch
        config.dynamic_batching.max_queue_delay_microseconds = int(wait_ms * 1000)
        for in_name, dtype, dims, optional in EMBEDDING_INPUTS:
            config.input.add(name=in_name, data_type=dtype, dims=dims, optional=optional)
        config.output.add(name="embedding", data_type=mc.TYPE_FP32,
                          dims=[builtin.dimensions or -1])
        config.output.add(name="token_count", data_type=mc.TYPE_INT32, dims=[1])
        params |= {"max_batch": max_batch, "context_length": builtin.context_length}
    gpus = int(spec.resources.get("gpu_count") or 0)
    instances = int(s.get("instances") or 1)
    if gpus:
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=instances,
                                  gpus=list(range(gpus)))
    else:
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    env = s.get("execution_env") or execution_env
    if env:
        params["EXECUTION_ENV_PATH"] = env
    for key, value in params.items():
        config.parameters[key].string_value = str(value)
    return config


def _write(path: Path, data: str) -> None:
    # Written beside and renamed: a server reading the repository never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(data)
    tmp.replace(path)


def write_repository(root: Path, spec: DeploymentSpec, name: str, **kw: Any) -> Path:
    """Writes `<root>/<name>/config.pbtxt` and `<root>/<name>/1/model.py`; returns the model's
    folder. `kw` goes to model_config."""
    config = model_config(spec, name, **kw)
    folder = root / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    _write(folder / "config.pbtxt", text_format.MessageToString(config))
    tmp = folder / "1" / f".model.py.{os.getpid()}.tmp"
    shutil.copyfile(MODEL_SOURCE, tmp)
    tmp.replace(folder / "1" / "model.py")
    return folder
