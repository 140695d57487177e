"""Kubernetes placement of the local and vllm runtimes.

Two kinds of tests, and neither talks to a real cluster (none can run here: no kube-apiserver
binary is packaged on PyPI or in Debian, and there is no Docker):

- Manifest tests: the Deployment, Service and Pod JSON go through kubernetes-asyncio's own model
  classes (deserialize into V1Deployment/V1Service/V1Pod and serialize back) so a misspelt or
  misplaced field is lost and fails the test; the local runtime's container command is run for
  real by `sh` with the real catalog resolving the model file.
- PROTOCOL tests (marked below): the real kubernetes-asyncio client, configured from a real
  kubeconfig file, talks HTTP to `FakeApiServer`, a small in-process stand-in for the API server
  that records each request and keeps the objects in a dict (server-side apply creates or
  replaces, merge patch merges, foreground delete lingers a moment as the garbage collector would).
  They check the requests the placement sends (verbs, paths, content types, field manager,
  propagation policy) and how it reacts to the answers (404, 403, a terminating object) — not
  the API server's own semantics (admission, scheduling, controllers), which only a real cluster
  shows.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiohttp import web
from kubernetes_asyncio import client as k8s

from services.inference import app as inference_app
from services.inference import kubernetes as placement
from services.inference.kubernetes import (
    PORT,
    KubernetesCluster,
    KubernetesRuntime,
    label_value,
    object_name,
    pod_problems,
    vllm_command,
)
from services.inference.models import Deployment
from services.inference.runtimes import remote
from services.inference.runtimes.base import DeploymentSpec, Replica
from services.inference.runtimes.local import LocalRuntime
from services.inference.runtimes.remote import VllmRuntime
from services.inference.settings import InferenceSettings
from services.inference.supervisor import Supervisor
from services.inference.worker import parse_args
from workbench.db import Database
from workbench.devservers import free_port
from workbench.migrations import upgrade

REPO = Path(__file__).resolve().parents[3]
NAMESPACE = "models"
IMAGE = "registry.example.com/xai-workbench:1.4.0"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def settings(**kw: Any) -> InferenceSettings:
    base: dict[str, Any] = dict(
        inference_kubernetes=True, inference_k8s_image=IMAGE,
        inference_k8s_namespace=NAMESPACE, inference_health_interval_s=0.05,
        inference_start_timeout_s=5.0, inference_restart_backoff_s=0.05,
        inference_max_restarts=2)
    base.update(kw)
    return InferenceSettings(**base)


def spec(**kw: Any) -> DeploymentSpec:
    base: dict[str, Any] = dict(
        id=str(uuid.uuid4()), org_id=str(uuid.uuid4()), name="assistant", kind="chat",
        runtime="local", replicas=2, model="builtin:smollm2-135m-instruct",
        settings={"n_ctx": 1024}, resources={"cpu": 2, "memory_mb": 2048})
    base.update(kw)
    return DeploymentSpec(**base)


def gpu_spec(**kw: Any) -> DeploymentSpec:
    return spec(runtime="vllm", name="qwen", model="external:x", settings={
        "model": "/models/Qwen2.5-7B-Instruct", "max_model_len": 8192, "dtype": "bfloat16"},
        resources={"cpu": 8, "memory_mb": 32768, "gpu_count": 2,
                   "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
                   "tolerations": [{"key": "dedicated", "operator": "Equal",
                                    "value": "inference", "effect": "NoSchedule"}]}, **kw)


@pytest.fixture
async def models() -> AsyncIterator[k8s.ApiClient]:
    """kubernetes-asyncio's client, for its (de)serializer and for runtimes that send nothing."""
    api = k8s.ApiClient()
    yield api
    await api.close()


def to_model(api: k8s.ApiClient, data: dict[str, Any], klass: str) -> Any:
    """Deserialize API JSON into kubernetes-asyncio's model class, as the client does."""
    response = SimpleNamespace(data=json.dumps(data))  # all deserialize reads of a response
    return api.deserialize(response, klass)  # type: ignore[arg-type]


def to_json(api: k8s.ApiClient, model: Any) -> Any:
    return api.sanitize_for_serialization(model)


def local_runtime(tmp_path: Path) -> LocalRuntime:
    return LocalRuntime(tmp_path, default_n_ctx=2048, threads=0)


# ---- manifests ---------------------------------------------------------------------------------

async def test_gpu_deployment_manifest_is_a_valid_apps_v1_deployment(
        tmp_path: Path, models: k8s.ApiClient) -> None:
    s = gpu_spec()
    rt = KubernetesRuntime(VllmRuntime(tmp_path), models, settings(), NAMESPACE)
    deployment, _ = rt.manifests(s)
    model = to_model(models, deployment, "V1Deployment")
    assert to_json(models, model) == deployment  # nothing misspelt or misplaced was dropped

    assert model.metadata.name == object_name(s.id) and model.metadata.namespace == NAMESPACE
    assert model.metadata.labels[placement.DEPLOYMENT_LABEL] == s.id
    assert model.metadata.labels[placement.ORG_LABEL] == s.org_id
    assert model.spec.replicas == 2
    assert model.spec.strategy.rolling_update.max_surge == 0  # no spare GPU needed to roll
    template = model.spec.template
    assert model.spec.selector.match_labels.items() <= template.metadata.labels.items()
    pod = template.spec
    assert pod.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in [
        to_json(models, t) for t in pod.tolerations]
    assert {"key": "dedicated", "operator": "Equal", "value": "inference",
            "effect": "NoSchedule"} in [to_json(models, t) for t in pod.tolerations]
    assert pod.enable_service_links is False and pod.automount_service_account_token is False
    (container,) = pod.containers
    assert container.image == InferenceSettings().inference_k8s_vllm_image
    assert container.resources.requests == container.resources.limits == {
        "cpu": "8", "memory": "32768Mi", "nvidia.com/gpu": "2"}
    assert container.command[:3] == ["vllm", "serve", "/models/Qwen2.5-7B-Instruct"]
    assert container.command[container.command.index("--tensor-parallel-size") + 1] == "2"
    assert container.command[container.command.index("--host") + 1] == "0.0.0.0"
    assert container.command[container.command.index("--port") + 1] == str(PORT)
    assert container.ports[0].container_port == PORT and container.ports[0].name == "http"
    for probe in (container.readiness_probe, container.liveness_probe, container.startup_probe):
        assert probe.http_get.path == "/health" and probe.http_get.port == "http"
    # The startup probe lets a model load for as long as the supervisor waits for it.
    assert container.startup_probe.period_seconds * container.startup_probe.failure_threshold \
        >= settings().inference_start_timeout_s
    assert {e.name: e.value for e in container.env}["HF_HUB_OFFLINE"] == "1"
    assert [m.mount_path for m in container.volume_mounts] == ["/dev/shm"]
    assert pod.volumes[0].empty_dir.medium == "Memory"


async def test_service_manifest_selects_the_deployments_pods(
        tmp_path: Path, models: k8s.ApiClient) -> None:
    s = spec()
    rt = KubernetesRuntime(local_runtime(tmp_path), models, settings(), NAMESPACE)
    deployment, service = rt.manifests(s)
    model = to_model(models, service, "V1Service")
    assert to_json(models, model) == service
    assert model.metadata.name == deployment["metadata"]["name"]
    assert model.spec.type == "ClusterIP" and model.spec.cluster_ip is None
    assert model.spec.selector == deployment["spec"]["selector"]["matchLabels"]
    (port,) = model.spec.ports
    assert port.port == PORT and port.target_port == "http"
    assert rt.base_url(s.id) == (f"http://{object_name(s.id)}.{NAMESPACE}.svc.cluster.local:"
                                 f"{PORT}/v1")


async def test_cpu_deployment_has_no_gpu_request_toleration_or_strategy(
        tmp_path: Path, models: k8s.ApiClient) -> None:
    s = spec(resources={"cpu": 4})
    rt = KubernetesRuntime(local_runtime(tmp_path), models, settings(), NAMESPACE)
    model = to_model(models, rt.manifests(s)[0], "V1Deployment")
    (container,) = model.spec.template.spec.containers
    assert container.resources.limits == {"cpu": "4"}
    assert model.spec.template.spec.tolerations is None
    assert model.spec.strategy is None and model.spec.template.spec.node_selector is None
    assert container.image == IMAGE


async def test_local_container_command_runs_the_worker_on_all_interfaces(
        tmp_path: Path, models: k8s.ApiClient) -> None:
    """The exact container command, run by a real `sh`: the image's catalog finds the model
    file, and the worker's own argument parser accepts what it gets."""
    s = spec(settings={"n_ctx": 1024, "threads": 2})
    rt = KubernetesRuntime(local_runtime(tmp_path), models, settings(), NAMESPACE)
    command = rt.command(s)
    assert command[:2] == ["sh", "-c"] and sys.executable not in command
    # `python` of the "image": runs -c snippets, prints the argv of anything else.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_python = bindir / "python"
    fake_python.write_text(
        f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\n'
        f'exec {sys.executable} -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"\n')
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
                         env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
    argv = json.loads(out.stdout)
    assert argv[:2] == ["-m", "services.inference.worker"]
    args = parse_args(argv[2:])
    assert args.host == "0.0.0.0" and args.port == PORT
    assert args.model.is_file() and args.model.suffix == ".gguf"
    assert (args.kind, args.model_name, args.n_ctx, args.threads) == ("chat", "assistant", 1024, 2)


def test_vllm_container_command_matches_the_vllm_runtime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote.shutil, "which", lambda _: "/usr/local/bin/vllm")
    for s in (gpu_spec(), spec(runtime="vllm", resources={}, settings={
            "model": "m", "gpu_memory_utilization": 0.8, "extra_args": ["--enforce-eager"]})):
        local = VllmRuntime(tmp_path).command(s, 4321)
        local[0] = "vllm"
        local[local.index("--host") + 1] = "0.0.0.0"
        local[local.index("--port") + 1] = str(PORT)
        assert vllm_command(s) == local
    with pytest.raises(ValueError, match=r"settings\.model"):
        vllm_command(spec(runtime="vllm", settings={}))


def test_object_names_are_dns_1035_labels_and_stable() -> None:
    ids = [str(uuid.uuid4()), "D1", "x" * 80, "--weird__ID--", "9abc", "ünïcode/😀"]
    names = [object_name(i) for i in ids]
    for name in names:
        assert DNS_1035.match(name) and len(name) <= 63, name
    assert len(set(names)) == len(names)
    assert object_name(ids[0]) == f"wb-model-{ids[0]}"  # a uuid is kept whole, readable
    assert names == [object_name(i) for i in ids]
    assert object_name("D1") != object_name("d1")


def test_label_values_are_valid_label_values() -> None:
    for value in ("org-1", "-x-", "a" * 100, "a b/c", "ü", str(uuid.uuid4())):
        assert LABEL_VALUE.match(label_value(value)) and len(label_value(value)) <= 63


async def test_pod_problems_name_unschedulable_and_crash_looping_pods(
        models: k8s.ApiClient) -> None:
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}
    pending = to_model(models, {"metadata": {"name": "p1"}, "status": {
        "phase": "Pending", "conditions": [unschedulable]}}, "V1Pod")
    crashing = to_model(models, {"metadata": {"name": "p2"}, "status": {"containerStatuses": [{
        "name": "model", "image": IMAGE, "imageID": "", "ready": False, "restartCount": 4,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 1m20s"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}, "V1Pod")
    creating = to_model(models, {"metadata": {"name": "p3"}, "status": {"containerStatuses": [{
        "name": "model", "image": IMAGE, "imageID": "", "ready": False, "restartCount": 0,
        "state": {"waiting": {"reason": "ContainerCreating"}}}]}}, "V1Pod")
    assert pod_problems(pending) == [
        "pod p1 cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."]
    assert pod_problems(crashing) == [
        "pod p2: CrashLoopBackOff: back-off 1m20s (last exit code 1, Error)"]
    assert pod_problems(creating) == []


async def test_local_placement_needs_the_platform_image(
        tmp_path: Path, models: k8s.ApiClient) -> None:
    with pytest.raises(ValueError, match="WB_INFERENCE_K8S_IMAGE"):
        KubernetesRuntime(local_runtime(tmp_path), models, settings(inference_k8s_image=""),
                          NAMESPACE)


# ---- PROTOCOL tests: the real client against FakeApiServer (not a real API server) ---------

@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    authorization: str


class FakeApiServer:
    """PROTOCOL double of the Kubernetes API server for deployments, services and pods: records
    requests, keeps objects in a dict. Not a real API server (no admission, no controllers)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name)
        self.pods: list[dict[str, Any]] = []
        self.requests: list[Recorded] = []
        self.forbidden: set[tuple[str, str]] = set()  # (method, kind) answered 403
        self.delete_linger_s = 0.0
        self.port = free_port()
        app = web.Application()
        app.router.add_route("*", "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
                             self._object("deployments"))
        app.router.add_route("*", "/api/v1/namespaces/{ns}/services/{name}",
                             self._object("services"))
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        app.router.add_get("/health", self._health)  # the model server behind the Service
        self.runner = web.AppRunner(app)

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    # -- what tests look at / set --

    def calls(self, method: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if method is None or r.method == method]

    def deployment(self, deployment_id: str) -> Any:  # the stored object, or None
        return self.objects.get(("deployments", object_name(deployment_id)))

    def set_ready(self, deployment_id: str, ready: int) -> None:
        """What the Deployment controller would write to the status subresource."""
        obj = self.objects[("deployments", object_name(deployment_id))]
        obj["status"] = {"replicas": obj["spec"]["replicas"], "readyReplicas": ready,
                         "availableReplicas": ready, "observedGeneration": 1}

    # -- handlers --

    def _status(self, code: int, reason: str, message: str) -> web.Response:
        return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                  "status": "Failure", "message": message, "reason": reason,
                                  "code": code}, status=code)

    async def _record(self, request: web.Request) -> Recorded:
        raw = await request.read()
        rec = Recorded(request.method, request.path, dict(request.query),
                       request.headers.get("Content-Type", ""),
                       json.loads(raw) if raw else None,
                       request.headers.get("Authorization", ""))
        self.requests.append(rec)
        return rec

    def _object(self, kind: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            rec = await self._record(request)
            name = request.match_info["name"]
            key = (kind, name)
            if (request.method, kind) in self.forbidden:
                return self._status(403, "Forbidden", (
                    f'{kind}.apps "{name}" is forbidden: User "system:serviceaccount:wb:'
                    f'inference" cannot {request.method.lower()} resource "{kind}" in API '
                    f'group "apps" in the namespace "{NAMESPACE}"'))
            current = self.objects.get(key)
            if request.method == "GET":
                if current is None:
                    return self._status(404, "NotFound", f'{kind} "{name}" not found')
                return web.json_response(current)
            if request.method == "PATCH" and rec.content_type == "application/apply-patch+yaml":
                if current is None:
                    current = json.loads(json.dumps(rec.body))
                    current["metadata"].update(uid=str(uuid.uuid4()), resourceVersion="1",
                                               creationTimestamp="2025-01-01T00:00:00Z")
                    current["status"] = {}
                    self.objects[key] = current
                else:  # the only field manager: its applied fields replace the old ones
                    current["metadata"]["labels"] = rec.body["metadata"]["labels"]
                    current["metadata"]["annotations"] = rec.body["metadata"]["annotations"]
                    current["spec"] = rec.body["spec"]
                return web.json_response(current)
            if request.method == "PATCH" and rec.content_type == "application/merge-patch+json":
                if current is None:
                    return self._status(404, "NotFound", f'{kind} "{name}" not found')
                _merge(current, rec.body)
                return web.json_response(current)
            if request.method == "DELETE":
                if current is None:
                    return self._status(404, "NotFound", f'{kind} "{name}" not found')
                if self.delete_linger_s and kind == "deployments":
                    current["metadata"]["deletionTimestamp"] = "2025-01-01T00:01:00Z"
                    current["metadata"]["finalizers"] = ["foregroundDeletion"]
                    asyncio.get_running_loop().call_later(
                        self.delete_linger_s, lambda: self.objects.pop(key, None))
                    return web.json_response(current)
                del self.objects[key]
                return web.json_response({"kind": "Status", "apiVersion": "v1",
                                          "metadata": {}, "status": "Success"})
            return self._status(405, "MethodNotAllowed", request.method)
        return handle

    async def _pods(self, request: web.Request) -> web.Response:
        await self._record(request)
        key, _, value = request.query.get("labelSelector", "").partition("=")
        items = [p for p in self.pods if p["metadata"].get("labels", {}).get(key) == value]
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                  "items": items})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "queue_depth": 3})


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON merge patch (RFC 7386)."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = v


class ToFakeServer(httpx.AsyncBaseTransport):
    """Sends requests for <service>.<ns>.svc.cluster.local to the fake server (no cluster DNS)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert request.url.host.endswith(f".{NAMESPACE}.svc.cluster.local")
        request.url = request.url.copy_with(host="127.0.0.1", port=self.port)
        return await self.inner.handle_async_request(request)


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    await server.start()
    yield server
    await server.runner.cleanup()


@pytest.fixture
def kubeconfig(tmp_path: Path, api: FakeApiServer) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{api.port}"}}],
        "users": [{"name": "inference", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "inference"}}]}))
    return path


@pytest.fixture
async def cluster(kubeconfig: Path) -> AsyncIterator[KubernetesCluster]:
    c = await KubernetesCluster.connect(settings(inference_k8s_kubeconfig=str(kubeconfig)))
    yield c
    await c.close()


@pytest.fixture
async def http(api: FakeApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=ToFakeServer(api.port)) as c:
        yield c


async def test_protocol_deploy_applies_service_and_deployment_server_side(
        api: FakeApiServer, cluster: KubernetesCluster, tmp_path: Path) -> None:
    rt = cluster.place(local_runtime(tmp_path))
    s = spec()
    r0 = await rt.launch(s, 0)
    r1 = await rt.launch(s, 1)
    assert r0.base_url == r1.base_url == rt.base_url(s.id) and r0.proc is None
    name = object_name(s.id)
    patches = api.calls("PATCH")
    assert [(p.path, p.content_type) for p in patches] == [
        (f"/api/v1/namespaces/{NAMESPACE}/services/{name}", "application/apply-patch+yaml"),
        (f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}",
         "application/apply-patch+yaml")]
    for p in patches:
        assert p.query["fieldManager"] == "xai-workbench-inference"
        assert p.query["force"].lower() == "true"
        assert p.authorization == "Bearer test-token"  # from the kubeconfig
    deployment, service = rt.manifests(s)
    assert [p.body for p in patches] == [service, deployment]
    assert api.deployment(s.id)["spec"]["replicas"] == 2
    assert ("services", name) in api.objects
    assert len(api.calls("PATCH")) == 2  # the second replica found it applied


async def test_protocol_health_follows_the_deployments_ready_pods(
        api: FakeApiServer, cluster: KubernetesCluster, http: httpx.AsyncClient,
        tmp_path: Path) -> None:
    rt = cluster.place(VllmRuntime(tmp_path))
    s = gpu_spec()
    replicas = [await rt.launch(s, i) for i in range(2)]
    assert replicas[0].remote_model == "qwen"
    api.pods.append({"metadata": {"name": "qwen-abc", "labels": {
        placement.DEPLOYMENT_LABEL: s.id}}, "status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]}})
    api.set_ready(s.id, 1)
    assert await rt.health(replicas[0], http) == {"status": "ok", "queue_depth": 3}
    with pytest.raises(RuntimeError) as failed:
        await rt.health(replicas[1], http)
    assert "1 of 2 pods" in str(failed.value)
    assert "Insufficient nvidia.com/gpu" in str(failed.value)
    pod_lists = api.calls("GET")
    assert any(r.path == f"/api/v1/namespaces/{NAMESPACE}/pods" and
               r.query["labelSelector"] == f"{placement.DEPLOYMENT_LABEL}={s.id}"
               for r in pod_lists)
    # The replicas of one deployment share one status read per second.
    reads = len(api.calls("GET"))
    for _ in range(5):
        await rt.health(replicas[0], http)
    assert len(api.calls("GET")) == reads


async def test_protocol_scale_patches_replicas(
        api: FakeApiServer, cluster: KubernetesCluster, tmp_path: Path) -> None:
    rt = cluster.place(local_runtime(tmp_path))
    s = spec()
    replicas = [await rt.launch(s, i) for i in range(2)]
    s.replicas = 3  # what Supervisor.scale does before it launches index 2
    replicas.append(await rt.launch(s, 2))
    merges = [r for r in api.calls("PATCH") if r.content_type == "application/merge-patch+json"]
    assert [m.body for m in merges] == [{"spec": {"replicas": 3}}]
    assert api.deployment(s.id)["spec"]["replicas"] == 3
    s.replicas = 1  # then it stops the indices past the new count
    for r in reversed(replicas[1:]):
        r.status = "stopped"
        await rt.stop(r)
    merges = [r for r in api.calls("PATCH") if r.content_type == "application/merge-patch+json"]
    assert [m.body for m in merges] == [{"spec": {"replicas": 3}}, {"spec": {"replicas": 1}}]
    assert api.deployment(s.id)["spec"]["replicas"] == 1
    assert not api.calls("DELETE")


async def test_protocol_stop_deletes_deployment_and_service_in_foreground(
        api: FakeApiServer, cluster: KubernetesCluster, tmp_path: Path) -> None:
    rt = cluster.place(local_runtime(tmp_path))
    s = spec()
    replicas = [await rt.launch(s, i) for i in range(2)]
    for r in replicas:
        r.status = "stopped"
        await rt.stop(r)
    deletes = api.calls("DELETE")
    name = object_name(s.id)
    assert [d.path for d in deletes] == [
        f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}",
        f"/api/v1/namespaces/{NAMESPACE}/services/{name}"]
    assert all(d.body["propagationPolicy"] == "Foreground" for d in deletes)
    assert api.objects == {}


async def test_protocol_replica_replaced_after_failed_checks_deletes_nothing(
        api: FakeApiServer, cluster: KubernetesCluster, tmp_path: Path) -> None:
    rt = cluster.place(local_runtime(tmp_path))
    s = spec()
    r = await rt.launch(s, 0)
    r.status = "failed"
    await rt.stop(r)
    await rt.launch(s, 0)  # the keeper's relaunch
    assert not api.calls("DELETE") and len(api.calls("PATCH")) == 2


async def test_protocol_service_restart_adopts_what_runs_and_detach_keeps_it(
        api: FakeApiServer, kubeconfig: Path, tmp_path: Path) -> None:
    s = spec()
    first = await KubernetesCluster.connect(settings(inference_k8s_kubeconfig=str(kubeconfig)))
    rt = first.place(local_runtime(tmp_path))
    r = await rt.launch(s, 0)
    api.set_ready(s.id, 2)
    await first.close()  # detaches: shutting the service down leaves the workload running
    r.status = "stopped"
    await rt.stop(r)
    assert not api.calls("DELETE")
    before = copy.deepcopy(api.objects)

    again = await KubernetesCluster.connect(settings(inference_k8s_kubeconfig=str(kubeconfig)))
    try:
        rt2 = again.place(local_runtime(tmp_path))
        same = DeploymentSpec(**{**s.__dict__})  # what resume() rebuilds from the row
        await rt2.launch(same, 0)
        await rt2.launch(same, 1)
    finally:
        await again.close()
    assert len(api.calls("PATCH")) == 4  # applied once more, without an error
    assert api.objects == before  # same objects, status (the running pods) untouched


async def test_protocol_start_right_after_stop_waits_for_the_old_deployment_to_go(
        api: FakeApiServer, cluster: KubernetesCluster, tmp_path: Path) -> None:
    api.delete_linger_s = 0.6  # foreground deletion: the Deployment waits for its pods
    rt = cluster.place(local_runtime(tmp_path))
    s = spec(replicas=1)
    r = await rt.launch(s, 0)
    r.status = "stopped"
    await rt.stop(r)
    assert api.deployment(s.id)["metadata"]["deletionTimestamp"]
    restarted = DeploymentSpec(**{**s.__dict__})  # Supervisor.deploy: a new spec object
    started = asyncio.get_running_loop().time()
    await rt.launch(restarted, 0)
    assert asyncio.get_running_loop().time() - started >= 0.4
    current = api.deployment(s.id)
    assert current is not None and "deletionTimestamp" not in current["metadata"]


async def test_protocol_deployment_deleted_outside_is_not_recreated(
        api: FakeApiServer, cluster: KubernetesCluster, http: httpx.AsyncClient,
        tmp_path: Path) -> None:
    rt = cluster.place(local_runtime(tmp_path))
    s = spec()
    r = await rt.launch(s, 0)
    api.objects.clear()  # kubectl delete, or a stop through another service instance
    await asyncio.sleep(placement.STATUS_TTL_S + 0.1)
    with pytest.raises(RuntimeError, match="does not exist"):
        await rt.health(r, http)
    r.status = "failed"
    await rt.stop(r)
    with pytest.raises(RuntimeError, match="start the deployment again"):
        await rt.launch(s, 0)
    assert api.objects == {}


async def test_protocol_rbac_denial_names_the_missing_permission(
        api: FakeApiServer, cluster: KubernetesCluster, tmp_path: Path) -> None:
    api.forbidden.add(("PATCH", "deployments"))
    rt = cluster.place(local_runtime(tmp_path))
    with pytest.raises(RuntimeError, match=r"403 .*cannot patch resource \"deployments\""):
        await rt.launch(spec(), 0)


async def test_protocol_stop_that_cannot_delete_logs_and_leaves_the_objects(
        api: FakeApiServer, cluster: KubernetesCluster, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    rt = cluster.place(local_runtime(tmp_path))
    s = spec(replicas=1)
    r = await rt.launch(s, 0)
    api.forbidden.add(("DELETE", "deployments"))
    r.status = "stopped"
    await rt.stop(r)  # does not raise: the supervisor goes on stopping the other keepers
    assert api.deployment(s.id) is not None
    assert "left behind" in caplog.text and "cannot delete" in caplog.text


async def test_protocol_health_says_when_the_service_network_is_unreachable(
        api: FakeApiServer, cluster: KubernetesCluster, tmp_path: Path) -> None:
    rt = cluster.place(local_runtime(tmp_path))
    s = spec(replicas=1)
    r = await rt.launch(s, 0)
    api.set_ready(s.id, 1)
    # The Service's address, as seen from outside the cluster: nothing answers there.
    async with httpx.AsyncClient(transport=ToFakeServer(free_port())) as outside:
        with pytest.raises(RuntimeError, match="does not answer from this service"):
            await rt.health(r, outside)


async def test_protocol_vllm_attach_is_not_placed(
        api: FakeApiServer, cluster: KubernetesCluster, tmp_path: Path) -> None:
    rt = cluster.place(VllmRuntime(tmp_path))
    r = await rt.launch(spec(runtime="vllm", settings={"base_url": "http://gpu-box:8000/v1"}), 0)
    assert r.base_url == "http://gpu-box:8000/v1"
    r.status = "stopped"
    await rt.stop(r)
    assert api.requests == []


async def test_protocol_supervisor_runs_a_deployment_on_kubernetes(
        api: FakeApiServer, cluster: KubernetesCluster, tmp_path: Path) -> None:
    """The real Supervisor with the placement: statuses follow the Deployment's ready pods."""
    statuses: list[tuple[str, str]] = []

    async def on_status(deployment_id: str, status: str, reason: str) -> None:
        statuses.append((status, reason))

    sup = Supervisor(cluster.settings, {"local": cluster.place(local_runtime(tmp_path))},
                     on_status)
    await sup._http.aclose()
    sup._http = httpx.AsyncClient(transport=ToFakeServer(api.port))  # no cluster DNS here
    s = spec(replicas=2)
    try:
        await sup.deploy(s)
        await _until(lambda: api.deployment(s.id) is not None)
        assert sup.replicas(s.id) and all(r.status == "starting" for r in sup.replicas(s.id))
        assert statuses == []  # still deploying: no pod is ready
        api.set_ready(s.id, 1)
        await _until(lambda: [r.status for r in sup.replicas(s.id)] == ["ready", "starting"])
        assert statuses[-1] == ("running", "")
        assert sup.pick(s.id).base_url.startswith(f"http://{object_name(s.id)}.{NAMESPACE}.")
        api.set_ready(s.id, 2)
        await _until(lambda: [r.status for r in sup.replicas(s.id)] == ["ready", "ready"])
        await sup.scale(s.id, 1)
        assert api.deployment(s.id)["spec"]["replicas"] == 1
        await sup.stop(s.id)
        assert api.objects == {} and statuses[-1] == ("stopped", "")
    finally:
        await sup.close()


async def test_connect_without_credentials_says_what_to_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(RuntimeError, match="WB_INFERENCE_K8S_KUBECONFIG"):
        await KubernetesCluster.connect(settings())


async def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_replica_of_another_runtime_is_left_to_it(
        tmp_path: Path, models: k8s.ApiClient) -> None:
    rt = KubernetesRuntime(local_runtime(tmp_path), models, settings(), NAMESPACE)
    assert not rt._ours(Replica("d", 0, "http://127.0.0.1:4000/v1"))
    assert rt._ours(Replica("d", 0, rt.base_url("d")))


async def test_protocol_service_places_local_and_vllm_and_readopts_on_restart(
        api: FakeApiServer, kubeconfig: Path, tmp_path: Path) -> None:
    """The inference app with WB_INFERENCE_KUBERNETES on, started twice over the same database:
    each start resumes the running deployment by applying it again; no stop deletes it."""
    s = settings(inference_k8s_kubeconfig=str(kubeconfig), data_dir=tmp_path / "data",
                 access_log=False)
    db = Database.for_service(inference_app.NAME, s, s)
    try:
        await upgrade(db, inference_app.MIGRATIONS, inference_app.NAME)
        async with db.transaction() as tx:
            row = Deployment(org_id=uuid.uuid4(), name="assistant", kind="chat", runtime="local",
                             model="builtin:smollm2-135m-instruct", replicas=2,
                             resources={"cpu": 2}, settings={}, status="running",
                             created_by="user:test")
            tx.add(row)
            await tx.flush()
            deployment_id = str(row.id)
    finally:
        await db.dispose()
    for start in (1, 2):
        app = inference_app.create_app(s)
        async with app.router.lifespan_context(app):
            runtimes = app.state.supervisor.runtimes
            assert isinstance(runtimes["local"], KubernetesRuntime)
            assert isinstance(runtimes["vllm"], KubernetesRuntime)
            assert not isinstance(runtimes["openai"], KubernetesRuntime)
            await _until(lambda n=2 * start: len(api.calls("PATCH")) == n)
            assert api.deployment(deployment_id)["spec"]["replicas"] == 2
    assert not api.calls("DELETE")
    assert api.deployment(deployment_id)["metadata"]["labels"][placement.DEPLOYMENT_LABEL] \
        == deployment_id
