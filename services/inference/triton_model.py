"""A built-in model as Triton's Python backend runs it: the `triton` runtime copies this file as
`<repository>/<model>/1/model.py` (services/inference/triton_repo.py writes the config beside it).

It runs the inference worker's own engines and checks (services/inference/worker.py), so a
request gets the answer a `local` replica gives: llama.cpp chat and completions in a decoupled
model (streamed pieces, then a last response with the finish reason and the token counts) and
sentence-transformers embeddings, which Triton batches across requests. A request that is wrong
is answered with a TritonError whose message is the OpenAI error body as JSON (with its HTTP
status), which the bridge (services/inference/triton_bridge.py) answers as it is.

Only Triton's stub imports this module: `triton_python_backend_utils` exists only there, and
`services` is found on the `python_path` parameter (or installed in the model's environment).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]


def _text(request: Any, name: str) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _error(exc: Any) -> Any:
    """An OpenAIError of the worker as Triton carries it: the body and status as JSON."""
    return pb_utils.TritonError(json.dumps(exc.body() | {"status": exc.status}))


class _Chat:
    """Requests are generated one at a time in `execute` (Triton queues the others); pieces of a
    streamed request are sent as they come, and a cancelled request stops at its next token."""

    def __init__(self, params: dict[str, str]) -> None:
        self.w: Any = importlib.import_module("services.inference.worker")
        threads = int(params.get("threads") or 0) or None
        self.engine = self.w.ChatEngine(Path(params["model_path"]), params["served_model_name"],
                                        int(params.get("n_ctx") or 2048), threads,
                                        params.get("repack") == "true")
        # GenJob wants a loop and a future; generation here never touches them.
        self.loop = asyncio.new_event_loop()

    def _validate(self, model: Any, data: dict[str, Any]) -> Any:
        from pydantic import ValidationError

        try:
            return model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(p) for p in err.get("loc", ())) or None
            raise self.w.OpenAIError(f"Invalid '{param or 'body'}': {err['msg']}.", param,
                                     "invalid_value") from exc

    def _prepare(self, request: Any) -> tuple[bool, dict[str, Any], int]:
        """The request's generation arguments, checked as ChatEngine.chat / .complete check
        them: (chat, llama-cpp arguments, prompt tokens)."""
        w, e = self.w, self.engine
        try:
            params = json.loads(_text(request, "sampling_parameters") or "{}")
            messages = _text(request, "messages")
            messages = None if messages is None else json.loads(messages)
        except json.JSONDecodeError as exc:
            raise w.OpenAIError(f"We could not parse the JSON body of your request: {exc}.",
                                code="invalid_json") from exc
        if not isinstance(params, dict):
            raise w.OpenAIError("Invalid 'sampling_parameters': expected a JSON object.",
                                "sampling_parameters", "invalid_type")
        params.pop("stream", None)
        if messages is not None:
            req = self._validate(w.ChatRequest, params | {"messages": messages})
            chat_messages = w._chat_messages(req.messages)
            max_name = ("max_tokens" if req.max_completion_tokens is None else
                        "max_completion_tokens")
            max_tokens = getattr(req, max_name)
            args = w._sampling(req, max_tokens, max_name, e.n_vocab)
            args["response_format"] = w._response_format(req.response_format)
            prompt_tokens = e.count_chat(chat_messages)
            args["max_tokens"] = e._fit(prompt_tokens, max_tokens, "messages", None)
            args["messages"] = chat_messages
            return True, args, prompt_tokens
        text = _text(request, "text_input")
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if text is None and ids is None:
            raise w.OpenAIError("Missing required parameter: 'messages' (chat) or 'text_input' "
                                "or 'input_ids' (completion).", "messages",
                                "missing_required_parameter")
        prompt = text if text is not None else [int(t) for t in ids.as_numpy().reshape(-1)]
        req = self._validate(w.CompletionRequest, params | {"prompt": prompt})
        args = w._sampling(req, req.max_tokens, "max_tokens", e.n_vocab)
        if isinstance(prompt, str):
            tokens = e.llama.tokenize(prompt.encode(), True, True)
        else:
            tokens = prompt
            if any(not 0 <= t < e.n_vocab for t in tokens):
                raise w.OpenAIError("Invalid 'prompt': token id out of the model's vocabulary.",
                                    "prompt", "invalid_value")
        if not tokens:
            raise w.OpenAIError("Invalid 'prompt': the prompt is empty.", "prompt",
                                "invalid_value")
        args["max_tokens"] = e._fit(len(tokens), req.max_tokens, "prompt", 16)
        args["prompt"] = tokens
        return False, args, len(tokens)

    @staticmethod
    def _response(text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([finish.encode()], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([completion_tokens], dtype=np.int32))])

    def _serve(self, request: Any, sender: Any) -> None:
        stream_in = pb_utils.get_input_tensor_by_name(request, "stream")
        stream = bool(stream_in.as_numpy().reshape(-1)[0]) if stream_in is not None else False
        chat, args, prompt_tokens = self._prepare(request)
        job = self.w.GenJob("", chat, args | {"model": self.engine.name}, prompt_tokens, stream,
                            self.loop, self.loop.create_future())

        def emit(text: str) -> None:
            if request.is_cancelled():  # the client went away: stop at the next token
                job.cancel.set()
            elif stream:
                sender.send(self._response(text, "", prompt_tokens, 0))
            else:
                job.pieces.append(text)

        job.emit = emit
        try:
            text, finish, completion_tokens = self.engine._generate(job)
        except self.w.GenerationCancelled:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        sender.send(self._response("" if stream else text, finish, prompt_tokens,
                                   completion_tokens),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests: list[Any]) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._serve(request, sender)
            except self.w.OpenAIError as exc:
                sender.send(pb_utils.InferenceResponse(error=_error(exc)), flags=final)
            except Exception as exc:
                pb_utils.Logger.log_error(f"generation failed: {type(exc).__name__}: {exc}")
                failed = self.w.OpenAIError(f"generation failed: {exc}", None, None, 500,
                                            "server_error")
                sender.send(pb_utils.InferenceResponse(error=_error(failed)), flags=final)
        return None

    def finalize(self) -> None:
        self.engine.close()
        self.loop.close()


class _Embeddings:
    """Each request holds one or more texts (its batch dimension); the texts of all the requests
    Triton batched together are encoded in one call, as the worker encodes a batch."""

    def __init__(self, params: dict[str, str], device: str | None) -> None:
        worker: Any = importlib.import_module("services.inference.worker")
        threads = int(params.get("threads") or 0) or None
        self.engine = worker.EmbeddingEngine(
            Path(params["model_path"]), params["served_model_name"],
            int(params.get("max_batch") or 64), 0.0, threads)
        if device is not None:
            self.engine.model.to(device)

    def execute(self, requests: list[Any]) -> list[Any]:
        texts = [[t.decode("utf-8") for t in
                  pb_utils.get_input_tensor_by_name(r, "text_input").as_numpy().reshape(-1)]
                 for r in requests]
        try:
            vectors, counts = self.engine._encode([t for ts in texts for t in ts])
        except Exception as exc:
            pb_utils.Logger.log_error(f"encoding failed: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"encoding failed: {exc}")) for _ in requests]
        responses, start = [], 0
        for ts in texts:
            end = start + len(ts)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("embedding", np.ascontiguousarray(vectors[start:end],
                                                                  dtype=np.float32)),
                pb_utils.Tensor("token_count",
                                np.array(counts[start:end], dtype=np.int32).reshape(-1, 1))]))
            start = end
        return responses

    def finalize(self) -> None:
        self.engine.close()


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        path = params.get("python_path")
        if path and path not in sys.path:
            sys.path.insert(0, path)
        # As the worker: built-in models are local files, nothing is fetched from a hub.
        for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                           ("TOKENIZERS_PARALLELISM", "false"), ("TQDM_DISABLE", "1")):
            os.environ.setdefault(key, value)
        self.model: _Chat | _Embeddings
        if params["kind"] == "chat":
            self.model = _Chat(params)
        else:
            gpu = args.get("model_instance_kind") == "GPU"
            device = f"cuda:{args['model_instance_device_id']}" if gpu else None
            self.model = _Embeddings(params, device)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        return self.model.execute(requests)

    def finalize(self) -> None:
        self.model.finalize()
