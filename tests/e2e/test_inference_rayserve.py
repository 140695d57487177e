"""The `rayserve` runtime on the embedded platform, for real: the service starts its own Ray head
(one for the module), each replica is a Ray Serve application running the worker's FastAPI app on
the CPU, and the official `openai` client reaches it through the gateway. Ray's own Serve REST API
(the dashboard, with the head's token) is the witness of what runs on the cluster."""

from __future__ import annotations

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
import openai
import pytest

from tests.conftest import Platform
from tests.e2e.test_inference import cosine, deploy, wait_status
from workbench.testing import ApiUser, register, unique

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
# First use starts the Ray head and Serve (~45 s on 2 busy cores) before the model loads.
START_S = 400


@dataclass
class RayServed:
    platform: Platform
    owner: ApiUser
    key: str
    chat: dict[str, Any]
    embedder: dict[str, Any]

    @property
    def h(self) -> dict[str, str]:
        return self.owner.headers

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.platform.url + "/v1", api_key=self.key,
                             max_retries=0, timeout=120)

    @property
    def head(self) -> dict[str, Any]:
        """What the service wrote about its Ray head: address, dashboard, token."""
        state = self.platform.workdir / "data" / "inference" / "ray" / "head.json"
        return dict(json.loads(state.read_text()))

    def ray_env(self) -> dict[str, str]:
        return dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.head["token_path"])

    def serve_apps(self) -> dict[str, Any]:
        """Ray Serve's applications, as its REST API reports them."""
        token = Path(self.head["token_path"]).read_text().strip()
        r = httpx.get(self.head["dashboard_url"] + "/api/serve/applications/",
                      headers={"authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200, r.text
        return dict(r.json().get("applications") or {})


def app_name(d: dict[str, Any]) -> str:
    return f"wb-{d['id']}-0"


@pytest.fixture(scope="module")
def ray_served(embedded_platform: Platform) -> Iterator[RayServed]:
    with embedded_platform.client(timeout=120) as client:
        owner = register(client)
        key = client.post("/api/v1/api-keys", headers=owner.headers, json={
            "name": "models", "scopes": ["inference:read", "inference:execute"]})
        assert key.status_code == 201, key.text
        pending = [deploy(client, owner.headers, unique(f"ray-{kind}-"), model,
                          runtime="rayserve", settings=settings, start=False)
                   for kind, model, settings in (
                       ("chat", "builtin:smollm2-135m-instruct", {"n_ctx": 1024}),
                       ("emb", "builtin:all-minilm-l6-v2", {}))]
        for d in pending:  # both at once: they share the head that the first one starts
            r = client.post(f"/api/v1/inference/services/{d['id']}/start", headers=owner.headers)
            assert r.status_code == 200, r.text
        chat, embedder = (wait_status(client, owner.headers, d["id"], "running", timeout=START_S)
                          for d in pending)
        yield RayServed(embedded_platform, owner, key.json()["key"], chat, embedder)
        for d in (chat, embedder):  # the platform lives on for other modules; Serve empties
            client.post(f"/api/v1/inference/services/{d['id']}/stop", headers=owner.headers)


# ---- serving ----------------------------------------------------------------------------------

def test_embeddings_and_chat_from_serve_apps_with_the_openai_client(
        ray_served: RayServed) -> None:
    oai = ray_served.client()
    texts = ["The cat sits on the mat.", "The cat sits on the mat.",
             "Quarterly revenue grew by eight percent."]
    r = oai.embeddings.create(model=ray_served.embedder["name"], input=texts)
    vectors = [d.embedding for d in r.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert cosine(vectors[0], vectors[1]) == pytest.approx(1.0, abs=1e-5)
    assert cosine(vectors[0], vectors[2]) < 0.5
    assert r.usage.prompt_tokens > 0

    c = oai.chat.completions.create(
        model=ray_served.chat["name"], max_tokens=16, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert c.model == ray_served.chat["name"]
    assert c.choices[0].message.content and c.choices[0].message.content.strip()
    assert c.usage is not None and 0 < c.usage.completion_tokens <= 16

    stream = oai.chat.completions.create(
        model=ray_served.chat["name"], max_tokens=16, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count from one to five."}])
    pieces, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        pieces += [ch.delta.content for ch in chunk.choices if ch.delta and ch.delta.content]
    assert len(pieces) > 1 and "".join(pieces).strip()  # token by token, not one block
    assert usage is not None and usage.completion_tokens > 0

    # The worker's own OpenAI-shaped errors come back through Serve unchanged.
    with pytest.raises(openai.BadRequestError) as too_long:
        oai.chat.completions.create(model=ray_served.chat["name"], max_tokens=4000,
                                    messages=[{"role": "user", "content": "hi"}])
    assert too_long.value.code == "context_length_exceeded"


def test_each_replica_is_a_running_serve_application(ray_served: RayServed) -> None:
    apps = ray_served.serve_apps()
    for d in (ray_served.chat, ray_served.embedder):
        app = apps[app_name(d)]
        assert app["status"] == "RUNNING", app
        assert app["route_prefix"] == f"/{app_name(d)}"
    with ray_served.platform.client() as client:
        catalog = client.get("/api/v1/inference/models", headers=ray_served.h).json()
        assert all("rayserve" in m["runtimes"] for m in catalog if m["source"] == "builtin")
        external = client.post("/api/v1/inference/models", headers=ray_served.h, json={
            "name": unique("ext-"), "kind": "chat", "base_url": "http://127.0.0.1:9/v1",
            "remote_model": "m"}).json()
        bad = client.post("/api/v1/inference/services", headers=ray_served.h, json={
            "name": unique("x-"), "model": external["id"], "runtime": "rayserve"})
        assert bad.status_code == 422 and "rayserve" in bad.text, bad.text


# ---- lifecycle --------------------------------------------------------------------------------

def test_a_serve_app_deleted_behind_the_services_back_is_replaced(
        ray_served: RayServed) -> None:
    d, name = ray_served.embedder, app_name(ray_served.embedder)
    subprocess.run([sys.executable, "-c", (
        "import sys, ray; from ray import serve; "
        "ray.init(address=sys.argv[1], log_to_driver=False); serve.delete(sys.argv[2])"),
        ray_served.head["address"], name], env=ray_served.ray_env(), check=True,
        capture_output=True, timeout=120)
    assert name not in ray_served.serve_apps()
    with ray_served.platform.client() as client:
        deadline = time.monotonic() + 240
        while True:
            now = client.get(f"/api/v1/inference/services/{d['id']}", headers=ray_served.h)
            replica = now.json()["replica_status"][0]
            if replica["restarts"] >= 1 and replica["status"] == "ready":
                break
            assert now.json()["status"] != "failed", now.json()
            assert time.monotonic() < deadline, now.json()
            time.sleep(0.5)
    assert ray_served.serve_apps()[name]["status"] == "RUNNING"
    r = ray_served.client().embeddings.create(model=d["name"], input="back again")
    assert len(r.data[0].embedding) == 384


def test_stop_deletes_the_serve_application(ray_served: RayServed) -> None:
    d = ray_served.chat
    with ray_served.platform.client(timeout=120) as client:
        r = client.post(f"/api/v1/inference/services/{d['id']}/stop", headers=ray_served.h)
        assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
        assert app_name(d) not in ray_served.serve_apps()
        assert app_name(ray_served.embedder) in ray_served.serve_apps()
        with pytest.raises(openai.APIStatusError) as down:
            ray_served.client().chat.completions.create(
                model=d["name"], max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        assert down.value.status_code == 503
        assert client.delete(f"/api/v1/inference/services/{d['id']}",
                             headers=ray_served.h).status_code == 204
