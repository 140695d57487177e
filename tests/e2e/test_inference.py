"""The inference service through the gateway with the official `openai` client and a platform API
key: the built-in models on the local runtime (SmolLM2 by llama.cpp, all-MiniLM-L6-v2 by
sentence-transformers, each replica its own worker process), deployments' lifecycle, a 90/10
traffic split, a replica killed mid-request, bad input in OpenAI's error shape, the token quota,
content-safety rules, metrics, tenancy — on the embedded platform; and the `openai` runtime of the
distributed platform serving through the embedded one (a second, real OpenAI-compatible server)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import REPO, WB, Platform
from workbench.testing import ApiUser, register, unique

pytestmark = [pytest.mark.timeout(600)]


@dataclass
class Served:
    platform: Platform
    owner: ApiUser
    key: str
    chat: dict[str, Any]
    embedder: dict[str, Any]

    @property
    def h(self) -> dict[str, str]:
        return self.owner.headers

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.platform.url + "/v1", api_key=self.key,
                             max_retries=0, timeout=120, **kw)


def deploy(client: httpx.Client, h: dict[str, str], name: str, model: str, *,
           replicas: int = 1, settings: dict[str, Any] | None = None,
           start: bool = True, **extra: Any) -> dict[str, Any]:
    r = client.post("/api/v1/inference/services", headers=h, json={
        "name": name, "model": model, "replicas": replicas, "settings": settings or {},
        **extra})
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["status"] == "pending"
    if start:
        r = client.post(f"/api/v1/inference/services/{d['id']}/start", headers=h)
        assert r.status_code == 200, r.text
        d = wait_status(client, h, d["id"], "running")
    return d


def wait_status(client: httpx.Client, h: dict[str, str], deployment_id: str, status: str,
                timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        d = client.get(f"/api/v1/inference/services/{deployment_id}", headers=h).json()
        if d["status"] == status and (status != "running" or all(
                r["status"] == "ready" for r in d["replica_status"])):
            return dict(d)
        assert d["status"] != "failed" or status == "failed", d
        assert time.monotonic() < deadline, f"never {status}: {d}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def served(embedded_platform: Platform) -> Iterator[Served]:
    with embedded_platform.client(timeout=120) as client:
        owner = register(client)
        r = client.post("/api/v1/api-keys", headers=owner.headers, json={
            "name": "models", "scopes": ["inference:read", "inference:execute"]})
        assert r.status_code == 201, r.text
        chat = deploy(client, owner.headers, "chat", "builtin:smollm2-135m-instruct",
                      settings={"n_ctx": 1024})
        embedder = deploy(client, owner.headers, "embedder", "builtin:all-minilm-l6-v2")
        yield Served(embedded_platform, owner, r.json()["key"], chat, embedder)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# ---- the openai client ------------------------------------------------------------------------

def test_chat_completion_with_the_openai_client(served: Served) -> None:
    r = served.client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0, seed=7)
    assert r.model == "chat"
    assert r.choices[0].message.content and r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = served.client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0, seed=7)
    assert again.choices[0].message.content == r.choices[0].message.content


def test_streamed_chat_completion(served: Served) -> None:
    stream = served.client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=32, stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta and c.delta.content:
                pieces.append(c.delta.content)
    assert "".join(pieces).strip()
    assert usage is not None and usage.completion_tokens > 0


def test_completions_json_mode_and_stop(served: Served) -> None:
    c = served.client().completions.create(model="chat", prompt="The sky is", max_tokens=12)
    assert c.choices[0].text
    j = served.client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Give a JSON object with a key a."}],
        max_tokens=160, temperature=0, response_format={"type": "json_object"})
    text = (j.choices[0].message.content or "").strip()
    assert text.startswith("{")  # constrained to JSON from the first token
    if j.choices[0].finish_reason == "stop":  # a 135M model may ramble past max_tokens
        assert isinstance(json.loads(text), dict)


def test_embeddings_with_the_openai_client(served: Served) -> None:
    texts = ["The cat sits on the mat.", "The cat sits on the mat.",
             "Quarterly revenue grew by eight percent."]
    r = served.client().embeddings.create(model="embedder", input=texts)
    vectors = [d.embedding for d in r.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert cosine(vectors[0], vectors[1]) == pytest.approx(1.0, abs=1e-5)
    assert cosine(vectors[0], vectors[2]) < 0.5
    assert r.usage.prompt_tokens > 0


# ---- bad input --------------------------------------------------------------------------------

def test_bad_input_is_a_clear_4xx_in_openai_shape(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "hi"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=[])
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model="chat", max_tokens=100_000,
                                       messages=[{"role": "user", "content": "hi"}])
    assert too_many.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="chat", max_tokens=8, messages=[
            {"role": "user", "content": "word " * 3000}])
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as wrong_kind:
        client.embeddings.create(model="chat", input="x")
    assert wrong_kind.value.code == "wrong_model_kind"
    raw = httpx.post(served.platform.url + "/v1/chat/completions", content=b"{not json",
                     headers={"authorization": f"Bearer {served.key}",
                              "content-type": "application/json"})
    assert raw.status_code == 400
    assert raw.json()["error"]["code"] == "invalid_json"
    unauth = httpx.post(served.platform.url + "/v1/chat/completions", json={"model": "chat"})
    assert unauth.status_code == 401 and "error" in unauth.json()


# ---- lifecycle, split, crash, metrics ----------------------------------------------------------

def test_lifecycle_start_stop_scale_delete(served: Served) -> None:
    with served.platform.client(timeout=120) as client:
        d = deploy(client, served.h, unique("emb-"), "builtin:all-minilm-l6-v2")
        base = f"/api/v1/inference/services/{d['id']}"
        r = client.post(base + "/scale", headers=served.h, json={"replicas": 2})
        assert r.status_code == 200 and r.json()["replicas"] == 2
        d = wait_status(client, served.h, d["id"], "running")
        assert len(d["replica_status"]) == 2
        assert client.post(base + "/stop", headers=served.h).json()["status"] == "stopped"
        with pytest.raises(openai.APIStatusError) as down:
            served.client().embeddings.create(model=d["name"], input="x")
        assert down.value.status_code == 503
        assert client.delete(base, headers=served.h).status_code == 204
        assert client.get(base, headers=served.h).status_code == 404


def test_a_deployment_that_cannot_start_fails_with_the_reason(served: Served) -> None:
    """vLLM is not installed on this machine: the deployment ends `failed`, saying so."""
    with served.platform.client(timeout=120) as client:
        model = client.post("/api/v1/inference/models", headers=served.h, json={
            "name": unique("ext-"), "kind": "chat", "base_url": "http://127.0.0.1:9/v1",
            "remote_model": "m"}).json()
        d = deploy(client, served.h, unique("vllm-"), model["id"], runtime="vllm",
                   settings={"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}, start=False)
        assert client.post(f"/api/v1/inference/services/{d['id']}/start",
                           headers=served.h).status_code == 200
        failed = wait_status(client, served.h, d["id"], "failed", timeout=60)
        assert "vllm is not installed" in failed["reason"]
        bad = client.post("/api/v1/inference/services", headers=served.h, json={
            "name": unique("x-"), "model": model["id"], "runtime": "local"})
        assert bad.status_code == 422
        missing = client.post("/api/v1/inference/services", headers=served.h, json={
            "name": unique("x-"), "model": "builtin:no-such-model"})
        assert missing.status_code == 404


def test_ninety_ten_split_over_a_thousand_requests(served: Served) -> None:
    with served.platform.client(timeout=120) as client:
        b = deploy(client, served.h, unique("emb-b-"), "builtin:all-minilm-l6-v2")
        a = served.embedder
        route = unique("split-")
        r = client.post("/api/v1/inference/routes", headers=served.h, json={
            "name": route, "arms": [{"deployment_id": a["id"], "weight": 90},
                                    {"deployment_id": b["id"], "weight": 10}]})
        assert r.status_code == 201, r.text

        def count(d: dict[str, Any]) -> int:
            m = client.get(f"/api/v1/inference/services/{d['id']}/metrics", headers=served.h)
            return int(m.json()["by_route"].get(route, {}).get("requests", 0))

        oai = served.client()
        for i in range(1000):
            oai.embeddings.create(model=route, input=f"sentence {i}")
        to_a, to_b = count(a), count(b)
        assert to_a + to_b == 1000
        assert 850 <= to_a <= 950, (to_a, to_b)
        # shifting weights needs no restart
        r = client.put(f"/api/v1/inference/routes/{r.json()['id']}", headers=served.h, json={
            "arms": [{"deployment_id": a["id"], "weight": 0},
                     {"deployment_id": b["id"], "weight": 1}]})
        assert r.status_code == 200
        before = count(b)
        for i in range(20):
            oai.embeddings.create(model=route, input=f"after {i}")
        assert count(b) == before + 20


def worker_pids(deployment_name: str) -> list[int]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if "services.inference.worker" in line and f"--model-name {deployment_name} " in
            line + " "]


def test_a_killed_replica_is_replaced_and_its_request_gets_a_clear_error(
        served: Served) -> None:
    with served.platform.client(timeout=120) as client:
        name = unique("crash-")
        d = deploy(client, served.h, name, "builtin:smollm2-135m-instruct",
                   settings={"n_ctx": 512})
        [pid] = worker_pids(name)
        stream = served.client().chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Tell a long story."}],
            max_tokens=400, stream=True)
        got_error = False
        try:
            for n, chunk in enumerate(stream):
                if n == 3:
                    os.kill(pid, signal.SIGKILL)
                del chunk
        except openai.APIError as exc:
            got_error = "replica" in str(exc).lower()
        assert got_error, "the interrupted stream did not end with a clear error"
        deadline = time.monotonic() + 120
        while True:
            d = client.get(f"/api/v1/inference/services/{d['id']}", headers=served.h).json()
            if d["replica_status"][0]["restarts"] >= 1 or worker_pids(name) not in ([], [pid]):
                if d["status"] == "running" and d["replica_status"][0]["status"] == "ready":
                    break
            assert time.monotonic() < deadline, d
            time.sleep(0.3)
        assert worker_pids(name) and worker_pids(name) != [pid]
        ok = served.client().chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
        assert ok.choices[0].message.content is not None


def test_metrics_of_a_deployment(served: Served) -> None:
    oai = served.client()
    for _ in range(3):
        list(oai.chat.completions.create(model="chat", max_tokens=8, stream=True,
                                         messages=[{"role": "user", "content": "Hi"}]))
    with served.platform.client() as client:
        r = client.get(f"/api/v1/inference/services/{served.chat['id']}/metrics",
                       headers=served.h)
        assert r.status_code == 200, r.text
        m = r.json()
        assert m["requests"] >= 3 and m["latency_ms"]["p50"] is not None
        assert m["time_to_first_token_ms"]["p50"] is not None
        assert m["tokens_per_s"] and m["tokens_per_s"] > 0


# ---- quota, safety, tenancy --------------------------------------------------------------------

def test_requests_over_the_token_quota_get_429(served: Served) -> None:
    with served.platform.client(timeout=120) as client:
        org = register(client)
        key = client.post("/api/v1/api-keys", headers=org.headers, json={
            "name": "k", "scopes": ["inference:execute"]}).json()["key"]
        deploy(client, org.headers, "small", "builtin:all-minilm-l6-v2")
        subprocess.run([*WB, "quota", "set", org.org_id, "tokens_per_day", "20"],
                       env=served.platform.env, check=True, cwd=REPO, capture_output=True)
        oai = openai.OpenAI(base_url=served.platform.url + "/v1", api_key=key, max_retries=0)
        oai.embeddings.create(model="small", input="one two three four five six seven " * 5)
        time.sleep(2.5)  # the quota read is cached for up to 2 s
        with pytest.raises(openai.RateLimitError) as err:
            oai.embeddings.create(model="small", input="again")
        assert err.value.code == "quota_exceeded"


def test_each_call_is_metered_as_a_usage_event_and_on_the_quota(served: Served) -> None:
    """One usage event per call (org, key, tokens, the request's id), written in the background
    by the metering writer, and the tokens added to the org's quota."""
    with served.platform.client(timeout=120) as client:
        org = register(client)
        made = client.post("/api/v1/api-keys", headers=org.headers, json={
            "name": "metered", "scopes": ["inference:execute"]}).json()
        deploy(client, org.headers, "meter", "builtin:all-minilm-l6-v2")
        h = {"authorization": f"Bearer {made['key']}"}
        sent: dict[str, int] = {}
        for i in range(5):
            rid = f"metered-{unique()}"
            r = client.post("/v1/embeddings", headers={**h, "x-request-id": rid}, json={
                "model": "meter", "input": ["tokens to meter"] * (i + 1)})
            assert r.status_code == 200, r.text
            sent[rid] = r.json()["usage"]["prompt_tokens"]
        bad = client.post("/v1/embeddings", headers=h, json={"model": "meter", "input": [""]})
        assert bad.status_code == 400
        deadline = time.monotonic() + 20
        while True:
            rows = served.platform.db_rows(
                "SELECT payload FROM wb_outbox WHERE type = 'wb.inference.usage.recorded'",
                service="inference")
            mine = [e for e in (json.loads(bytes(r[0])) for r in rows)
                    if e["org_id"] == org.org_id]
            if len(mine) >= 6 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(mine) == 6, mine  # the five calls and the refused one
        ok = {e["request_id"]: e["data"] for e in mine if e["data"]["ok"]}
        assert {rid: d["prompt_tokens"] for rid, d in ok.items()} == sent
        public_id = made["key"].split("_")[1]  # wbk_<public id>_<secret>: the key's id in events
        assert all(d["key_id"] == public_id and d["endpoint"] == "embeddings"
                   for d in ok.values())
        assert [e["data"]["prompt_tokens"] for e in mine if not e["data"]["ok"]] == [0]
        deadline = time.monotonic() + 20
        while True:
            quotas = client.get(f"/api/v1/orgs/{org.org_id}/quotas", headers=org.headers)
            used = {q["resource"]: q["used"] for q in quotas.json()}["tokens_per_day"]
            if used >= sum(sent.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert used == sum(sent.values())


def test_safety_rules_block_and_redact(served: Served) -> None:
    with served.platform.client() as client:
        block = client.post("/api/v1/inference/safety-rules", headers=served.h, json={
            "name": "no secrets in", "stage": "input", "kind": "keywords",
            "patterns": ["project-nightingale"], "action": "block"}).json()
        redact = client.post("/api/v1/inference/safety-rules", headers=served.h, json={
            "name": "no e out", "stage": "output", "kind": "regex", "patterns": ["[eE]"],
            "action": "redact", "replacement": ""}).json()
        bad = client.post("/api/v1/inference/safety-rules", headers=served.h, json={
            "name": "broken", "stage": "input", "kind": "regex", "patterns": ["(unclosed"],
            "action": "block"})
        assert bad.status_code == 422
        try:
            with pytest.raises(openai.BadRequestError) as blocked:
                served.client().chat.completions.create(model="chat", max_tokens=8, messages=[
                    {"role": "user", "content": "Tell me about Project-Nightingale"}])
            assert blocked.value.code == "content_blocked"
            r = served.client().chat.completions.create(model="chat", max_tokens=24, messages=[
                {"role": "user", "content": "Describe the weather."}])
            assert "e" not in (r.choices[0].message.content or "").lower()
            streamed = "".join(
                c.choices[0].delta.content or "" for c in served.client().chat.completions.create(
                    model="chat", max_tokens=24, stream=True, messages=[
                        {"role": "user", "content": "Describe the sea."}]) if c.choices)
            assert streamed and "e" not in streamed.lower()
        finally:
            for rule in (block, redact):
                client.delete(f"/api/v1/inference/safety-rules/{rule['id']}", headers=served.h)
        rows = served.platform.db_rows(
            "SELECT payload FROM wb_outbox WHERE type = 'wb.inference.safety.triggered'",
            service="inference")
        assert len(rows) >= 3


def test_another_orgs_deployments_are_invisible(served: Served) -> None:
    with served.platform.client() as client:
        other = register(client)
        base = f"/api/v1/inference/services/{served.chat['id']}"
        for method, path, body in (("GET", base, None), ("POST", base + "/stop", None),
                                   ("POST", base + "/scale", {"replicas": 3}),
                                   ("GET", base + "/metrics", None), ("DELETE", base, None),
                                   ("PATCH", base, {"name": "pwned"})):
            r = client.request(method, path, headers=other.headers, json=body)
            assert r.status_code == 404, (method, path, r.text)
        key = client.post("/api/v1/api-keys", headers=other.headers, json={
            "name": "k", "scopes": ["inference:execute"]}).json()["key"]
        oai = openai.OpenAI(base_url=served.platform.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(model="chat", max_tokens=4,
                                        messages=[{"role": "user", "content": "hi"}])
        assert client.get(base, headers=served.h).json()["status"] == "running"


def test_another_orgs_models_routes_and_rules_are_invisible(served: Served) -> None:
    with served.platform.client() as client:
        h = served.h
        model = client.post("/api/v1/inference/models", headers=h, json={
            "name": unique("ext"), "kind": "chat", "base_url": "http://127.0.0.1:9/v1",
            "remote_model": "m", "api_key": "sk-secret"}).json()
        route = client.post("/api/v1/inference/routes", headers=h, json={
            "name": unique("route"), "arms": [{"deployment_id": served.chat["id"],
                                               "weight": 1}]}).json()
        rule = client.post("/api/v1/inference/safety-rules", headers=h, json={
            "name": "kw", "stage": "input", "kind": "keywords", "patterns": ["zzz-never"],
            "action": "block"}).json()
        mid = model["id"].removeprefix("external:")
        other = register(client)
        try:
            for method, path, body in (
                    ("GET", f"/api/v1/inference/models/{mid}", None),
                    ("DELETE", f"/api/v1/inference/models/{mid}", None),
                    ("GET", f"/api/v1/inference/routes/{route['id']}", None),
                    ("PUT", f"/api/v1/inference/routes/{route['id']}",
                     {"arms": [{"deployment_id": served.chat["id"], "weight": 5}]}),
                    ("DELETE", f"/api/v1/inference/routes/{route['id']}", None),
                    ("PATCH", f"/api/v1/inference/safety-rules/{rule['id']}",
                     {"enabled": False}),
                    ("DELETE", f"/api/v1/inference/safety-rules/{rule['id']}", None)):
                r = client.request(method, path, headers=other.headers, json=body)
                assert r.status_code == 404, (method, path, r.text)
            # Lists show nothing of the first org; its ids cannot be borrowed either.
            for path in ("/api/v1/inference/routes", "/api/v1/inference/safety-rules",
                         "/api/v1/inference/services"):
                assert client.get(path, headers=other.headers).json()["items"] == [], path
            names = {m["name"] for m in client.get("/api/v1/inference/models",
                                                   headers=other.headers).json()}
            assert model["name"] not in names
            r = client.post("/api/v1/inference/routes", headers=other.headers, json={
                "name": "borrowed", "arms": [{"deployment_id": served.chat["id"],
                                              "weight": 1}]})
            assert r.status_code == 422 and "does not exist" in r.text
            r = client.post("/api/v1/inference/services", headers=other.headers, json={
                "name": "borrowed", "model": model["id"]})
            assert r.status_code == 404, r.text
            # Untouched for their owner.
            assert client.get(f"/api/v1/inference/routes/{route['id']}",
                              headers=h).json()["arms"][0]["weight"] == 1
            assert client.get(f"/api/v1/inference/models/{mid}", headers=h).status_code == 200
            assert any(r["id"] == rule["id"] and r["enabled"] for r in client.get(
                "/api/v1/inference/safety-rules", headers=h).json()["items"])
        finally:
            client.delete(f"/api/v1/inference/routes/{route['id']}", headers=h)
            client.delete(f"/api/v1/inference/safety-rules/{rule['id']}", headers=h)
            client.delete(f"/api/v1/inference/models/{mid}", headers=h)


def test_bad_input_on_management_routes(served: Served) -> None:
    with served.platform.client() as client:
        h = served.h
        missing = "0190c5f0-0000-7000-8000-000000000000"
        cases: list[tuple[str, str, Any, int, str]] = [
            # external models
            ("POST", "/api/v1/inference/models", {"name": "x", "kind": "chat"}, 422,
             "base_url"),
            ("POST", "/api/v1/inference/models", {"name": "x", "kind": "audio",
             "base_url": "http://h/v1", "remote_model": "m"}, 422, "kind"),
            ("POST", "/api/v1/inference/models", {"name": "x", "kind": "chat",
             "base_url": "not a url", "remote_model": "m"}, 422, "base_url"),
            ("POST", "/api/v1/inference/models", {"name": "smollm2-135m-instruct",
             "kind": "chat", "base_url": "http://h/v1", "remote_model": "m"}, 409, "built-in"),
            ("GET", "/api/v1/inference/models/not-an-id", None, 422, "model_id"),
            ("GET", f"/api/v1/inference/models/{missing}", None, 404, ""),
            # deployments
            ("POST", "/api/v1/inference/services", {"name": "x", "model": "builtin:nope"}, 404,
             "catalog"),
            ("POST", "/api/v1/inference/services", {"name": "x",
             "model": "builtin:smollm2-135m-instruct", "replicas": 0}, 422, "replicas"),
            ("POST", "/api/v1/inference/services", {"name": "x",
             "model": "builtin:smollm2-135m-instruct", "runtime": "openai"}, 422, "runtime"),
            ("POST", "/api/v1/inference/services", {"name": "chat",
             "model": "builtin:smollm2-135m-instruct"}, 409, "taken"),
            ("POST", f"/api/v1/inference/services/{served.chat['id']}/scale",
             {"replicas": 99}, 422, "replicas"),
            ("PATCH", f"/api/v1/inference/services/{served.chat['id']}", {"name": None}, 422,
             "name"),
            ("GET", f"/api/v1/inference/services/{missing}/metrics", None, 404, ""),
            # routes
            ("POST", "/api/v1/inference/routes", {"name": "r", "arms": []}, 422, "arms"),
            ("POST", "/api/v1/inference/routes", {"name": "r", "arms": [
                {"deployment_id": served.chat["id"], "weight": -1}]}, 422, "weight"),
            ("POST", "/api/v1/inference/routes", {"name": "r", "arms": [
                {"deployment_id": served.chat["id"], "weight": 1},
                {"deployment_id": served.embedder["id"], "weight": 1}]}, 422, "same kind"),
            ("POST", "/api/v1/inference/routes", {"name": "r", "arms": [
                {"deployment_id": served.chat["id"], "weight": 1},
                {"deployment_id": served.chat["id"], "weight": 2}]}, 422, "two arms"),
            ("PUT", f"/api/v1/inference/routes/{missing}", {"arms": [
                {"deployment_id": served.chat["id"], "weight": 1}]}, 404, ""),
            # safety rules
            ("POST", "/api/v1/inference/safety-rules", {"name": "r", "stage": "sometimes",
             "kind": "keywords", "patterns": ["a"], "action": "block"}, 422, "stage"),
            ("POST", "/api/v1/inference/safety-rules", {"name": "r", "stage": "input",
             "kind": "keywords", "patterns": [], "action": "block"}, 422, "patterns"),
            ("POST", "/api/v1/inference/safety-rules", {"name": "r", "stage": "input",
             "kind": "pii", "patterns": ["shoe_size"], "action": "redact"}, 422, "shoe_size"),
            ("PATCH", f"/api/v1/inference/safety-rules/{missing}", {"enabled": False}, 404, ""),
        ]
        for method, path, body, status, needle in cases:
            r = client.request(method, path, headers=h, json=body)
            assert r.status_code == status, (method, path, body, r.status_code, r.text)
            assert needle in r.text, (method, path, body, r.text)
            if status != 404 or needle:
                assert r.headers["content-type"].startswith("application/problem+json"), r.text
        r = client.post("/api/v1/inference/routes", headers={**h, "content-type":
                        "application/json"}, content=b"{not json")
        assert r.status_code == 400 and r.json()["code"] == "malformed_json", r.text
        assert client.get(f"/api/v1/inference/services/{served.chat['id']}",
                          headers=h).json()["status"] == "running"


# ---- the openai runtime against a second server ------------------------------------------------

def test_openai_runtime_serves_through_another_platform(served: Served,
                                                       distributed_platform: Platform) -> None:
    with distributed_platform.client(timeout=120) as client:
        owner = register(client)
        r = client.post("/api/v1/inference/models", headers=owner.headers, json={
            "name": "remote-smol", "kind": "chat", "base_url": served.platform.url + "/v1",
            "remote_model": "chat", "api_key": served.key, "context_length": 1024})
        assert r.status_code == 201, r.text
        model = r.json()
        assert model["has_api_key"] is True and "api_key" not in model
        d = deploy(client, owner.headers, "remote", model["id"])
        assert d["runtime"] == "openai"
        key = client.post("/api/v1/api-keys", headers=owner.headers, json={
            "name": "k", "scopes": ["inference:execute"]}).json()["key"]
        oai = openai.OpenAI(base_url=distributed_platform.url + "/v1", api_key=key,
                            max_retries=0, timeout=120)
        out = oai.chat.completions.create(model="remote", max_tokens=12, messages=[
            {"role": "user", "content": "Say hello."}])
        assert out.model == "remote" and out.choices[0].message.content
        chunks = list(oai.chat.completions.create(model="remote", max_tokens=12, stream=True,
                                                  messages=[{"role": "user", "content": "Hi"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        stored = distributed_platform.db_rows("SELECT api_key FROM external_models",
                                              service="inference")
        assert all(served.key.encode() not in bytes(k) for (k,) in stored)
