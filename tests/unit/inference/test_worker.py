"""The model worker as a real process (SmolLM2 chat, all-MiniLM-L6-v2 embeddings) over HTTP: the
OpenAI shapes, streaming, 400s, dynamic batching, fairness and a client leaving mid-stream."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("sentence_transformers")
np = pytest.importorskip("numpy")

from services.inference.catalog_files import minilm_path, smollm2_gguf_path  # noqa: E402
from workbench.devservers import ServerProcess, free_port, wait_http  # noqa: E402

N_CTX = 2048
# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>): biased away, a generation runs
# until max_tokens, which makes "still generating" observable.
NO_EOS = {"0": -100, "2": -100}
HI = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Worker:
    url: str
    server: ServerProcess


def _start(kind: str, model: Path, tmp: Path, *extra: str) -> Worker:
    port = free_port()
    # No HF_HUB_OFFLINE from us and a proxy that goes nowhere: the worker must stay offline by
    # itself (it sets HF_HUB_OFFLINE before importing sentence-transformers).
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    server = ServerProcess([sys.executable, "-m", "services.inference.worker", "--kind", kind,
                            "--model", str(model), "--port", str(port), *extra],
                           env=env, log=tmp / f"{kind}.log").start()
    return Worker(f"http://127.0.0.1:{port}", server)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Worker]]:
    tmp = tmp_path_factory.mktemp("workers")
    # Both start at once: their model loads overlap.
    started = {"chat": _start("chat", smollm2_gguf_path(), tmp, "--n-ctx", str(N_CTX),
                              "--threads", "2"),
               "embedding": _start("embedding", minilm_path(), tmp, "--model-name", "minilm")}
    try:
        for w in started.values():
            wait_http(f"{w.url}/health", timeout=120, proc=w.server.proc, log=w.server.log)
        yield started
    finally:
        for w in started.values():
            w.server.stop()


@pytest.fixture(scope="module")
def chat(workers: dict[str, Worker]) -> str:
    return workers["chat"].url


@pytest.fixture(scope="module")
def emb(workers: dict[str, Worker]) -> str:
    return workers["embedding"].url


def post(url: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(url, json=body, timeout=300, **kw)


def stream_events(url: str, body: dict[str, Any]) -> list[Any]:
    """The SSE `data:` payloads of a streamed request, "[DONE]" kept as a string."""
    out: list[Any] = []
    with httpx.stream("POST", url, json=body, timeout=300) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def embed(url: str, inputs: str | list[str], **extra: Any) -> Any:
    r = post(f"{url}/v1/embeddings", {"input": inputs, "model": "minilm", **extra})
    assert r.status_code == 200, r.text
    return r.json()


def vectors(body: dict[str, Any]) -> Any:
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float64)


# ------------------------------------------------------------------------------------- chat


def test_health_and_models(chat: str, emb: str) -> None:
    h = httpx.get(f"{chat}/health").json()
    assert h == {"status": "ok", "kind": "chat", "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "queue_depth": 0, "busy": False, "n_ctx": N_CTX}
    h = httpx.get(f"{emb}/health").json()
    assert (h["status"], h["kind"], h["model"], h["queue_depth"], h["busy"]) == (
        "ok", "embedding", "minilm", 0, False)
    models = httpx.get(f"{chat}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert httpx.get(f"{emb}/v1/models").json()["data"][0]["id"] == "minilm"


def test_chat_completion(chat: str) -> None:
    r = post(f"{chat}/v1/chat/completions",
             {"model": "x", "messages": HI, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5 and 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_respected(chat: str) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 3, "logit_bias": NO_EOS}
    r = post(f"{chat}/v1/chat/completions", body).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"
    events = stream_events(f"{chat}/v1/chat/completions",
                           body | {"stream": True, "stream_options": {"include_usage": True}})
    assert events[-2]["usage"]["completion_tokens"] == 3


def test_chat_stream_matches_non_stream(chat: str) -> None:
    body = {"messages": HI, "max_tokens": 16, "temperature": 0}
    whole = post(f"{chat}/v1/chat/completions", body).json()
    events = stream_events(f"{chat}/v1/chat/completions",
                           body | {"stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() and text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    # Without include_usage: no usage chunk.
    plain = stream_events(f"{chat}/v1/chat/completions", body | {"stream": True})
    assert plain[-1] == "[DONE]" and all("usage" not in c for c in plain[:-1])


def test_completions(chat: str) -> None:
    r = post(f"{chat}/v1/completions", {"prompt": "The capital of France is", "max_tokens": 5,
                                        "temperature": 0, "logit_bias": NO_EOS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    events = stream_events(f"{chat}/v1/completions",
                           {"prompt": "The capital of France is", "max_tokens": 5,
                            "temperature": 0, "logit_bias": NO_EOS, "stream": True,
                            "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events[-2]["usage"] == body["usage"]
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == body["choices"][0]["text"]


def test_seed_repeatable(chat: str) -> None:
    for temperature in (0, 0.9):
        body = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 12,
                "temperature": temperature, "seed": 42}
        texts = {post(f"{chat}/v1/chat/completions", body).json()["choices"][0]["message"][
            "content"] for _ in range(2)}
        assert len(texts) == 1 and texts.pop()


def test_stop_sequences(chat: str) -> None:
    body = {"messages": [{"role": "user", "content": "Count from one to ten in words."}],
            "max_tokens": 24, "temperature": 0, "logit_bias": NO_EOS}
    free = post(f"{chat}/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    words = free.split()
    assert len(words) >= 3, free
    stop = words[2]
    expected = free[:free.index(stop)]
    for s in (stop, ["\u2603", stop]):
        r = post(f"{chat}/v1/chat/completions", body | {"stop": s}).json()["choices"][0]
        assert r["message"]["content"] == expected and r["finish_reason"] == "stop"
    events = stream_events(f"{chat}/v1/chat/completions", body | {"stop": stop, "stream": True})
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == expected and events[-2]["choices"][0]["finish_reason"] == "stop"


def test_json_mode(chat: str) -> None:
    r = post(f"{chat}/v1/chat/completions", {
        "messages": [{"role": "system", "content": "You answer in JSON."},
                     {"role": "user", "content": "Alice is 30. Give her name and age."}],
        "response_format": {"type": "json_object"}, "max_tokens": 200, "temperature": 0})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)


@pytest.mark.parametrize(("kind", "path", "body", "param", "code"), [
    ("chat", "chat/completions", {"messages": []}, "messages", "empty_array"),
    ("chat", "chat/completions", {"messages": [{"role": "user", "content": "hello " * 2100}]},
     "messages", "context_length_exceeded"),
    ("chat", "chat/completions", {"messages": HI, "max_tokens": N_CTX - 10}, "messages",
     "context_length_exceeded"),
    ("chat", "completions", {"prompt": "hello " * 2100}, "prompt", "context_length_exceeded"),
    ("chat", "chat/completions", {"messages": HI, "max_tokens": 0}, "max_tokens",
     "integer_below_min_value"),
    ("chat", "chat/completions", {"messages": HI, "temperature": 2.5}, "temperature",
     "decimal_above_max_value"),
    ("chat", "chat/completions", {"messages": HI, "temperature": -0.1}, "temperature",
     "decimal_below_min_value"),
    ("chat", "chat/completions", {"messages": HI, "top_p": 1.5}, "top_p",
     "decimal_above_max_value"),
    ("chat", "chat/completions", {"messages": HI, "temperature": "hot"}, "temperature",
     "invalid_type"),
    ("chat", "chat/completions", {"messages": [{"role": "king", "content": "x"}]},
     "messages[0].role", "invalid_value"),
    ("chat", "chat/completions", {"model": "x"}, "messages", "missing_required_parameter"),
    ("chat", "chat/completions", b'{"messages": [', None, "invalid_json"),
    ("chat", "completions", {"prompt": ""}, "prompt", "invalid_value"),
    ("chat", "embeddings", {"input": "hello"}, None, "unsupported_endpoint"),
    ("embedding", "chat/completions", {"messages": HI}, None, "unsupported_endpoint"),
    ("embedding", "completions", {"prompt": "x"}, None, "unsupported_endpoint"),
    ("embedding", "embeddings", {"input": []}, "input", "empty_array"),
    ("embedding", "embeddings", {"input": ["a"] * 2049}, "input", "array_above_max_length"),
    ("embedding", "embeddings", {"input": ["a", ""]}, "input", "invalid_value"),
    ("embedding", "embeddings", {"input": "a", "encoding_format": "hex"}, "encoding_format",
     "invalid_value"),
    ("embedding", "embeddings", {"input": "a", "dimensions": 100}, "dimensions",
     "unsupported_value"),
])
def test_bad_input_is_an_openai_400(workers: dict[str, Worker], kind: str, path: str,
                                    body: dict[str, Any] | bytes, param: str | None,
                                    code: str) -> None:
    url = f"{workers[kind].url}/v1/{path}"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = post(url, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    if code == "context_length_exceeded":
        assert str(N_CTX) in error["message"]
        assert any(n.isdigit() and int(n) > N_CTX for n in error["message"].split())


def test_client_leaving_mid_stream_frees_the_replica(chat: str) -> None:
    body = {"messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 1500, "logit_bias": NO_EOS, "stream": True}
    with httpx.stream("POST", f"{chat}/v1/chat/completions", json=body, timeout=300) as r:
        seen, busy = 0, None
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 4:
                # Still generating while the client holds the stream. Checked inside the loop:
                # leaving it closes the connection (httpcore closes a stream whose iteration is
                # abandoned), and the worker may notice that within a token.
                busy = httpx.get(f"{chat}/health").json()["busy"]
                break
        assert busy is True
    # 1500 tokens would take ~20 s: the generation stops at the next token instead.
    deadline = time.monotonic() + 5
    while httpx.get(f"{chat}/health").json()["busy"]:
        assert time.monotonic() < deadline, "the abandoned generation is still running"
        time.sleep(0.05)
    r2 = post(f"{chat}/v1/chat/completions", {"messages": HI, "max_tokens": 4})
    assert r2.status_code == 200 and r2.json()["choices"][0]["message"]["content"]


async def test_tenants_are_served_round_robin(chat: str) -> None:
    finished: list[str] = []
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 24,
            "logit_bias": NO_EOS}
    async with httpx.AsyncClient(base_url=chat, timeout=300) as client:

        async def ask(tenant: str) -> None:
            r = await client.post("/v1/chat/completions", json=body,
                                  headers={"x-wb-tenant": tenant})
            assert r.status_code == 200
            finished.append(tenant)

        a = [asyncio.create_task(ask("A")) for _ in range(5)]
        for _ in range(500):  # A's requests are in: one generating, (at least) three waiting
            h = (await client.get("/health")).json()
            if h["busy"] and h["queue_depth"] >= 3:
                break
            await asyncio.sleep(0.005)
        else:
            pytest.fail(f"tenant A's requests never queued: {h}")
        done_before_b = len(finished)
        await asyncio.gather(*a, ask("B"))
    assert len(finished) == 6 and finished.index("B") < 5, finished
    # Round-robin: B goes right after A's running request and the one next in A's line.
    assert finished.index("B") <= done_before_b + 2, finished


def test_openai_client(chat: str, emb: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{chat}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=8)
    assert r.choices[0].message.content and r.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True})
    parts = list(stream)
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens <= 8
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=HI, temperature=3)
    assert err.value.code == "decimal_above_max_value"
    e = openai.OpenAI(base_url=f"{emb}/v1", api_key="unused").embeddings.create(
        model="minilm", input=["one", "two"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 384


# ------------------------------------------------------------------------------ embeddings


def test_embeddings_are_normalised_and_meaningful(emb: str) -> None:
    body = embed(emb, "The cat sits on the mat.")
    assert body["object"] == "list" and body["model"] == "minilm"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 5
    v = vectors(body)[0]
    assert v.shape == (384,)
    again = vectors(embed(emb, "The cat sits on the mat."))[0]
    assert abs(float(v @ again) - 1.0) < 1e-5
    other = vectors(embed(emb, "Quarterly tax filings are due in April."))[0]
    assert float(v @ other) < 0.5
    near = vectors(embed(emb, "A cat is sitting on a rug."))[0]
    assert float(v @ near) > float(v @ other) + 0.2
    b64 = embed(emb, "The cat sits on the mat.", encoding_format="base64")["data"][0]
    decoded = np.frombuffer(base64.b64decode(b64["embedding"]), dtype="<f4")
    assert np.allclose(decoded, v, atol=1e-6)


def test_batch_matches_single_inputs(emb: str) -> None:
    texts = [f"Sentence number {i} is about {'cats' if i % 2 else 'the stock market'}."
             + " More words." * (i % 7) for i in range(100)]
    batch = embed(emb, texts)
    got = vectors(batch)
    assert got.shape == (100, 384)
    singles = [embed(emb, t) for t in texts]
    expected = np.stack([vectors(s)[0] for s in singles])
    assert np.abs(got - expected).max() < 1e-5
    assert batch["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)


async def test_concurrent_embedding_requests(emb: str) -> None:
    texts = [f"Request {i}: " + ("dogs bark" if i % 3 else "rain falls") for i in range(20)]
    expected = {t: vectors(embed(emb, [t, t + " again"])) for t in texts}
    async with httpx.AsyncClient(base_url=emb, timeout=300) as client:
        responses = await asyncio.gather(*(
            client.post("/v1/embeddings", json={"input": [t, t + " again"]}) for t in texts))
    for t, r in zip(texts, responses, strict=True):
        assert r.status_code == 200
        assert np.abs(vectors(r.json()) - expected[t]).max() < 1e-5


# ---------------------------------------------------------------------------------- process


def test_logs_are_quiet(workers: dict[str, Worker]) -> None:
    for w in workers.values():
        lines = w.server.log.read_text().splitlines()
        assert len(lines) <= 3, lines
        assert not any("Traceback" in line or "%|" in line for line in lines), lines


def test_unloadable_model_exits_non_zero(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 100)
    for kind, model in (("chat", junk), ("embedding", tmp_path / "missing")):
        p = subprocess.run([sys.executable, "-m", "services.inference.worker", "--kind", kind,
                            "--model", str(model), "--port", str(free_port())],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1
        errors = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]
        assert len(errors) == 1 and "cannot load" in errors[0], p.stderr


async def test_embedding_engine_calls_torch_from_one_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch computes on OpenMP, which keeps a team of threads per calling thread: once a
    second thread had called in (the warm-up on the main thread, then requests on the encoding
    thread) every encode was slower (one sentence: 10 → 16 ms on 2 cores). Every call, the
    warm-up included, stays on the engine's one encoding thread."""
    import threading

    from sentence_transformers import SentenceTransformer

    from services.inference.worker import EmbeddingEngine, EmbeddingRequest

    callers: list[int] = []
    original = SentenceTransformer.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        callers.append(threading.get_ident())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "forward", forward)
    engine = EmbeddingEngine(minilm_path(), "minilm", 2, 0.0, None)
    runner = asyncio.create_task(engine.run())
    try:
        # one model batch, then three inputs: encode() with two model batches
        for inputs in (["one sentence"], ["three", "short", "sentences"]):
            r = await engine.embed(EmbeddingRequest(input=inputs, model="minilm"))
            assert len(json.loads(r.body)["data"]) == len(inputs)
    finally:
        runner.cancel()
        engine.close()
    assert len(callers) == 5  # two warm-ups (encode, one batch) and four model batches
    assert len(set(callers)) == 1 and threading.get_ident() not in callers


def test_one_batch_encode_gives_encodes_vectors_and_token_counts() -> None:
    """Inputs that fit one model batch skip encode()'s per-call work: the same modules on the
    same padded batch, so the vectors are encode()'s and usage counts the same tokens."""
    from services.inference.worker import EmbeddingEngine

    engine = EmbeddingEngine(minilm_path(), "minilm", 64, 0.0, None)
    try:
        assert engine._one_batch
        model = engine.model
        words = "the cat sat on a mat while quarterly filings were due in April".split()
        for n in (1, 5, 64, 65):  # 65: more than one model batch, through encode()
            texts = [" ".join(words[: 1 + (i * 7) % len(words)]) * (1 + i % 40)
                     for i in range(n)]  # up to ~500 words: some are truncated at 256 tokens
            got, counts = engine._executor.submit(engine._encode, texts).result()
            want = engine._executor.submit(
                model.encode, texts, batch_size=64, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False).result()
            assert got.shape == want.shape == (n, 384) and got.dtype == np.float32
            assert np.abs(got - want).max() < 1e-5, n
            ids = model.tokenizer(texts, truncation=True, max_length=engine.n_ctx)["input_ids"]
            assert counts == [len(x) for x in ids], n
            assert max(counts) == 256 or n < 64
    finally:
        engine.close()
