"""Kubernetes placement of the `local` and `vllm` runtimes (WB_INFERENCE_KUBERNETES=true): each
deployment runs as ONE apps/v1 Deployment (its pods run the runtime's own command) and ONE
ClusterIP Service in front of it, created with server-side apply through kubernetes-asyncio.

How this maps onto the supervisor's replicas. The supervisor keeps replica indices 0..n-1, each
with a keeper task that launches it, waits for it, checks it and replaces it. Pods have no stable
index, come and go, and Kubernetes already restarts, reschedules and load-balances them, so here a
replica is not a pod: every index gets the same base URL, the Service's, and replica i is ready
while at least i+1 of the Deployment's pods are ready (its status, read from the API server) and
the Service answers /health. So the replica list, the deployment status and a `failed` reason
follow the cluster, and the reason says why pods are not ready (unschedulable: insufficient
nvidia.com/gpu, ImagePullBackOff, CrashLoopBackOff and the last exit code). One replica per pod
was rejected: it would need pod IPs reachable from the service and a replica set rebuilt on
every pod churn, fighting the keepers; kube-proxy spreads the requests over the ready pods.

- launch(index) makes sure the objects exist: server-side apply of both the first time in this
  process (create or patch: a restart of the service adopts what runs, unchanged pods are not
  rolled), a patch of `spec.replicas` after a scale. It starts nothing itself. A Deployment
  that this process applied and that has vanished is not made again (it was deleted by kubectl
  or by a stop through another service instance): the replica fails and says so.
- stop(replica): a replica stopped by a scale-down patches `spec.replicas`; stopping the
  deployment deletes the Deployment and the Service (foreground propagation); a replica replaced
  after failing its checks deletes nothing (Kubernetes replaces pods itself). On shutdown
  `detach()` turns stop into nothing: the workloads keep serving and the next start adopts them.
- A vllm deployment that attaches to a running server (`settings.base_url`) is not placed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from services.inference.runtimes.base import DeploymentSpec, Replica, Runtime
from services.inference.runtimes.local import LocalRuntime
from services.inference.runtimes.remote import vllm_serve_args
from services.inference.settings import InferenceSettings

log = logging.getLogger("services.inference")

PORT = 8000  # every model container listens here; the Service exposes the same port
FIELD_MANAGER = "xai-workbench-inference"
DEPLOYMENT_LABEL = "xai-workbench.io/deployment-id"
ORG_LABEL = "xai-workbench.io/org-id"
RUNTIME_LABEL = "xai-workbench.io/runtime"
NAME_ANNOTATION = "xai-workbench.io/deployment-name"
MODEL_ANNOTATION = "xai-workbench.io/model"
PLACED_RUNTIMES = ("local", "vllm")
STATUS_TTL_S = 1.0  # the replicas of one deployment share one read of its status
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_APPLY = "application/apply-patch+yaml"
_MERGE = "application/merge-patch+json"


# ---- names and manifests (pure) ------------------------------------------------------------

def object_name(deployment_id: str) -> str:
    """The Deployment's and the Service's name: a DNS-1035 label (a Service's rule, stricter
    than a Deployment's), derived from the id only so that a rename never orphans objects."""
    slug = re.sub(r"[^a-z0-9-]+", "-", deployment_id.lower()).strip("-")
    name = f"wb-model-{slug}"
    if slug != deployment_id or len(name) > 63:
        digest = hashlib.sha256(deployment_id.encode()).hexdigest()[:10]
        name = f"wb-model-{slug[:40].strip('-')}-{digest}".replace("--", "-")
    return name


def label_value(value: str) -> str:
    """A valid label value: 63 characters of [A-Za-z0-9._-], alphanumeric at both ends."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63].strip("-._")


def _rewrite(args: list[str], values: dict[str, str]) -> list[str]:
    """Replaces the values of the given options; drops an option whose new value is ''."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in values and i + 1 < len(args):
            skip = True
            if values[arg]:
                out += [arg, values[arg]]
            continue
        out.append(arg)
    return out


def local_command(runtime: LocalRuntime, spec: DeploymentSpec) -> list[str]:
    """The local runtime's worker command line, as the container runs it: the image's `python`,
    listening on 0.0.0.0:PORT, and the built-in model's file found by the image's own catalog
    (its site-packages path differs from this machine's)."""
    args = runtime.command(spec, PORT)
    name = spec.model.removeprefix("builtin:")
    rest = _rewrite(args[1:], {"--host": "0.0.0.0", "--port": str(PORT), "--model": ""})
    resolve = f"from services.inference.catalog import BUILTINS; print(BUILTINS[{name!r}].path())"
    return ["sh", "-c", 'model="$(python -c "$1")" && shift && exec python "$@" --model "$model"',
            "sh", resolve, *rest]


def vllm_command(spec: DeploymentSpec) -> list[str]:
    """`vllm serve` for the vLLM image (its binary, not one looked up on this machine)."""
    return vllm_serve_args(spec, "0.0.0.0", PORT)


def resource_requirements(resources: dict[str, Any], gpu_resource: str) -> dict[str, Any]:
    """requests == limits: cpu (the threads the worker uses), memory (`memory_mb` or a quantity
    in `memory`), GPUs (an extended resource, which must be a limit)."""
    amounts: dict[str, str] = {}
    if resources.get("cpu"):
        amounts["cpu"] = str(resources["cpu"])
    if resources.get("memory_mb"):
        amounts["memory"] = f"{int(resources['memory_mb'])}Mi"
    elif resources.get("memory"):
        amounts["memory"] = str(resources["memory"])
    if int(resources.get("gpu_count") or 0) > 0:
        amounts[gpu_resource] = str(int(resources["gpu_count"]))
    return {"requests": amounts, "limits": dict(amounts)} if amounts else {}


def tolerations(resources: dict[str, Any], gpu_resource: str) -> list[dict[str, Any]]:
    """`resources.tolerations` as given, plus one for the taint GPU node pools commonly carry
    (`<gpu resource>:NoSchedule`) when GPUs are requested."""
    keys = ("key", "operator", "value", "effect", "tolerationSeconds")
    out = [{k: t[k] for k in keys if t.get(k) is not None}
           for t in resources.get("tolerations") or [] if isinstance(t, dict)]
    if int(resources.get("gpu_count") or 0) > 0 and not any(
            t.get("key") == gpu_resource for t in out):
        out.append({"key": gpu_resource, "operator": "Exists", "effect": "NoSchedule"})
    return out


def _probe(path: str, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failures}


def manifests(spec: DeploymentSpec, settings: InferenceSettings, command: list[str],
              namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment and the Service of one deployment, as the API's JSON."""
    name = object_name(spec.id)
    gpu_resource = settings.inference_k8s_gpu_resource
    selector = {DEPLOYMENT_LABEL: label_value(spec.id)}
    labels = {"app.kubernetes.io/name": "wb-model", "app.kubernetes.io/component": "inference",
              "app.kubernetes.io/managed-by": FIELD_MANAGER, **selector,
              ORG_LABEL: label_value(spec.org_id), RUNTIME_LABEL: label_value(spec.runtime)}
    annotations = {NAME_ANNOTATION: spec.name, MODEL_ANNOTATION: spec.model}
    local = spec.runtime == "local"
    offline = "1" if local or settings.inference_k8s_hf_offline else "0"
    env = [{"name": "HF_HUB_OFFLINE", "value": offline},
           {"name": "TRANSFORMERS_OFFLINE", "value": offline},
           {"name": "TOKENIZERS_PARALLELISM", "value": "false"}]
    health_timeout = max(1, math.ceil(settings.inference_health_timeout_s))
    container: dict[str, Any] = {
        "name": "model",
        "image": settings.inference_k8s_image if local else settings.inference_k8s_vllm_image,
        "command": command,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        # Loading a model takes a while: the startup probe allows the supervisor's start
        # timeout; after it, liveness restarts a hung server and readiness takes it out of the
        # Service while it cannot answer.
        "startupProbe": _probe("/health", 10, health_timeout, max(
            1, math.ceil(settings.inference_start_timeout_s / 10))),
        "readinessProbe": _probe("/health", 5, health_timeout,
                                 settings.inference_health_failures),
        "livenessProbe": _probe("/health", 10, health_timeout,
                                settings.inference_health_failures),
    }
    if resources := resource_requirements(spec.resources, gpu_resource):
        container["resources"] = resources
    pod: dict[str, Any] = {
        "containers": [container],
        # Service links would put e.g. VLLM_PORT into the environment (vLLM reads it).
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
    }
    if spec.resources.get("node_selector"):
        pod["nodeSelector"] = {str(k): str(v) for k, v in spec.resources["node_selector"].items()}
    if tols := tolerations(spec.resources, gpu_resource):
        pod["tolerations"] = tols
    if spec.runtime == "vllm":
        # vLLM's tensor parallelism shares memory between processes through /dev/shm.
        pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]  # noqa: S108
    deployment_spec: dict[str, Any] = {
        "replicas": spec.replicas,
        "selector": {"matchLabels": selector},
        "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod},
    }
    if int(spec.resources.get("gpu_count") or 0) > 0:
        # A surge pod would need a spare GPU during a rollout: replace one pod at a time.
        deployment_spec["strategy"] = {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    meta = {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                  "spec": deployment_spec}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": dict(meta),
               "spec": {"type": "ClusterIP", "selector": selector,
                        "ports": [{"name": "http", "port": PORT, "targetPort": "http",
                                   "protocol": "TCP"}]}}
    return deployment, service


# ---- why pods are not ready --------------------------------------------------------------

def pod_problems(pod: k8s.V1Pod) -> list[str]:
    """What keeps one pod from serving, in the API's words."""
    name = pod.metadata.name
    out: list[str] = []
    status = pod.status
    if status is None:
        return out
    for cond in status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            out.append(f"pod {name} cannot be scheduled: {cond.message or cond.reason}")
    for cs in (status.init_container_statuses or []) + (status.container_statuses or []):
        waiting = cs.state.waiting if cs.state else None
        if waiting is None or waiting.reason in (None, "ContainerCreating", "PodInitializing"):
            continue
        text = f"pod {name}: {waiting.reason}"
        if waiting.message:
            text += f": {waiting.message}"
        last = cs.last_state.terminated if cs.last_state else None
        if last is not None:
            text += f" (last exit code {last.exit_code}" + (
                f", {last.reason})" if last.reason else ")")
        out.append(text[:400])
    return out


@dataclass
class PlacementStatus:
    """One read of a Deployment: how many pods are ready and, when some are not, why."""

    name: str
    namespace: str
    ready: int
    desired: int
    problems: list[str] = field(default_factory=list)
    exists: bool = True

    def explain(self, index: int) -> str:
        where = f"Kubernetes Deployment {self.namespace}/{self.name}"
        if not self.exists:
            return (f"the {where} does not exist (deleted with kubectl, or stopped through "
                    "another inference-service instance): start the deployment again")
        text = f"{self.ready} of {self.desired} pods of the {where} are ready (replica {index} " \
               f"needs {index + 1})"
        return text + (": " + "; ".join(self.problems[:3]) if self.problems else "")


@dataclass
class _Placed:
    spec: DeploymentSpec
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    status_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    applied: bool = False  # applied by this process since the deployment was (re)started
    deleted: bool = False
    status: PlacementStatus | None = None
    status_at: float = 0.0


# ---- the placement ---------------------------------------------------------------------------

class KubernetesRuntime:
    """Runs the deployments of one runtime (`local` or `vllm`) on Kubernetes; same interface."""

    def __init__(self, inner: Runtime, api: k8s.ApiClient, settings: InferenceSettings,
                 namespace: str) -> None:
        if inner.name not in PLACED_RUNTIMES:
            raise ValueError(f"the {inner.name!r} runtime cannot be placed on Kubernetes")
        if inner.name == "local" and not settings.inference_k8s_image:
            raise ValueError("WB_INFERENCE_KUBERNETES is on but WB_INFERENCE_K8S_IMAGE is empty:"
                             " name the platform image (it runs services.inference.worker)")
        self.name = inner.name
        self.inner = inner
        self.settings = settings
        self.namespace = namespace
        self.apps = k8s.AppsV1Api(api)
        self.core = k8s.CoreV1Api(api)
        self._placed: dict[str, _Placed] = {}
        self._detached = False

    def base_url(self, deployment_id: str) -> str:
        host = ".".join(p for p in (object_name(deployment_id), self.namespace,
                                    self.settings.inference_k8s_service_domain) if p)
        return f"http://{host}:{PORT}/v1"

    def command(self, spec: DeploymentSpec) -> list[str]:
        if isinstance(self.inner, LocalRuntime):
            return local_command(self.inner, spec)
        return vllm_command(spec)

    def manifests(self, spec: DeploymentSpec) -> tuple[dict[str, Any], dict[str, Any]]:
        return manifests(spec, self.settings, self.command(spec), self.namespace)

    def detach(self) -> None:
        """From now on stop() leaves the workloads running (the service is shutting down)."""
        self._detached = True

    def _attaches(self, spec: DeploymentSpec) -> bool:
        return spec.runtime == "vllm" and bool(spec.settings.get("base_url"))

    def _ours(self, replica: Replica) -> bool:
        return replica.proc is None and replica.base_url == self.base_url(replica.deployment_id)

    # ---- Runtime ---------------------------------------------------------------------------

    async def launch(self, spec: DeploymentSpec, index: int) -> Replica:
        if self._attaches(spec):
            return await self.inner.launch(spec, index)
        placed = self._placed.get(spec.id)
        if placed is None or placed.spec is not spec:  # a new deploy() of this deployment
            placed = self._placed[spec.id] = _Placed(spec)
        async with placed.lock:
            await self._ensure(placed)
        return Replica(spec.id, index, self.base_url(spec.id),
                       remote_model=spec.name if spec.runtime == "vllm" else None)

    async def health(self, replica: Replica, client: httpx.AsyncClient) -> dict[str, Any]:
        if not self._ours(replica):
            return await self.inner.health(replica, client)
        placed = self._placed.get(replica.deployment_id)
        if placed is None:
            raise RuntimeError("this deployment was not placed by this service instance")
        status = await self._status(placed)
        if status.ready <= replica.index:
            raise RuntimeError(status.explain(replica.index))
        url = replica.base_url.removesuffix("/v1") + "/health"
        try:
            r = await client.get(url)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            raise RuntimeError(
                f"{status.ready} pods are ready but {url} does not answer from this service "
                f"({type(exc).__name__}: {exc}); the service must reach the cluster's Service "
                "network (WB_INFERENCE_K8S_SERVICE_DOMAIN)") from exc
        try:
            body = r.json()
        except ValueError:  # vLLM answers /health with an empty body
            body = {}
        return body if isinstance(body, dict) else {}

    async def stop(self, replica: Replica) -> None:
        if not self._ours(replica):
            await self.inner.stop(replica)
            return
        # A replica that failed its checks is relaunched by its keeper: Kubernetes replaces
        # the pods itself, nothing is deleted.
        if self._detached or replica.status != "stopped":
            return
        placed = self._placed.get(replica.deployment_id)
        if placed is None or placed.deleted:
            return
        async with placed.lock:
            if placed.deleted:
                return
            name = object_name(placed.spec.id)
            # Failures are logged, not raised (like a process that will not die), so that the
            # supervisor still stops the other replicas' keepers.
            scale_down = replica.index >= placed.spec.replicas
            try:
                if scale_down:
                    current = await self._read(name)
                    if current is not None and current.spec.replicas != placed.spec.replicas:
                        await self._patch_replicas(name, placed.spec.replicas)
                    return
                await self._delete(name)
            except RuntimeError as exc:
                log.error("the Kubernetes objects %s/%s of deployment %s are left %s: %s",
                          self.namespace, name, placed.spec.id,
                          "unscaled" if scale_down else "behind", exc)
                return
            placed.deleted, placed.applied, placed.status = True, False, None

    # ---- the API calls ---------------------------------------------------------------------

    async def _ensure(self, placed: _Placed) -> None:
        spec = placed.spec
        name = object_name(spec.id)
        current = await self._read(name)
        if current is not None and current.metadata.deletion_timestamp is not None:
            await self._wait_deleted(name)  # a restart right after a stop
            current = None
        if current is None and placed.applied:
            raise RuntimeError(PlacementStatus(name, self.namespace, 0, spec.replicas,
                                               exists=False).explain(0))
        if current is None or not placed.applied:
            deployment, service = self.manifests(spec)
            # The client's stubs omit `_content_type`, which its code takes (server-side apply).
            try:
                await self.core.patch_namespaced_service(  # type: ignore[call-arg]
                    name, self.namespace, service, field_manager=FIELD_MANAGER, force=True,
                    _content_type=_APPLY)
                await self.apps.patch_namespaced_deployment(  # type: ignore[call-arg]
                    name, self.namespace, deployment, field_manager=FIELD_MANAGER, force=True,
                    _content_type=_APPLY)
            except ApiException as exc:
                raise _api_error(exc, f"applying {self.namespace}/{name}") from exc
            placed.applied, placed.deleted = True, False
            log.info("applied Kubernetes Deployment and Service %s/%s (%d replicas)",
                     self.namespace, name, spec.replicas)
        elif current.spec.replicas != spec.replicas:
            await self._patch_replicas(name, spec.replicas)
        placed.status = None

    async def _read(self, name: str) -> k8s.V1Deployment | None:
        try:
            deployment: k8s.V1Deployment = await self.apps.read_namespaced_deployment(
                name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, f"reading {self.namespace}/{name}") from exc
        return deployment

    async def _wait_deleted(self, name: str) -> None:
        deadline = time.monotonic() + self.settings.inference_start_timeout_s
        while await self._read(name) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Kubernetes Deployment {self.namespace}/{name} is still "
                                   "being deleted: try again when its pods are gone")
            await asyncio.sleep(0.5)

    async def _patch_replicas(self, name: str, replicas: int) -> None:
        try:
            await self.apps.patch_namespaced_deployment(  # type: ignore[call-arg]
                name, self.namespace, {"spec": {"replicas": replicas}},
                field_manager=FIELD_MANAGER, _content_type=_MERGE)
        except ApiException as exc:
            raise _api_error(exc, f"scaling {self.namespace}/{name}") from exc
        log.info("scaled Kubernetes Deployment %s/%s to %d replicas", self.namespace, name,
                 replicas)

    async def _delete(self, name: str) -> None:
        options = k8s.V1DeleteOptions(propagation_policy="Foreground")
        for delete, kind in ((self.apps.delete_namespaced_deployment, "Deployment"),
                             (self.core.delete_namespaced_service, "Service")):
            try:
                await delete(name, self.namespace, body=options)
            except ApiException as exc:
                if exc.status != 404:
                    raise _api_error(exc, f"deleting the {kind} {self.namespace}/{name}") from exc
        log.info("deleted Kubernetes Deployment and Service %s/%s", self.namespace, name)

    async def _status(self, placed: _Placed) -> PlacementStatus:
        async with placed.status_lock:
            if placed.status is None or time.monotonic() - placed.status_at > STATUS_TTL_S:
                placed.status = await self._read_status(placed.spec)
                placed.status_at = time.monotonic()
            return placed.status

    async def _read_status(self, spec: DeploymentSpec) -> PlacementStatus:
        name = object_name(spec.id)
        current = await self._read(name)
        if current is None:
            return PlacementStatus(name, self.namespace, 0, spec.replicas, exists=False)
        ready = (current.status.ready_replicas if current.status else None) or 0
        desired = current.spec.replicas if current.spec.replicas is not None else 1
        status = PlacementStatus(name, self.namespace, ready, desired)
        if ready >= desired:
            return status
        for cond in (current.status.conditions if current.status else None) or []:
            if (cond.type, cond.status) in (("ReplicaFailure", "True"), ("Progressing", "False")):
                status.problems.append(f"{cond.reason}: {cond.message}")
        try:
            pods = await self.core.list_namespaced_pod(
                self.namespace, label_selector=f"{DEPLOYMENT_LABEL}={label_value(spec.id)}",
                limit=20)
        except ApiException as exc:
            status.problems.append(f"listing its pods failed: {_api_error(exc, 'list')}")
            return status
        for pod in pods.items:
            status.problems += pod_problems(pod)
        return status


def _api_error(exc: ApiException, doing: str) -> RuntimeError:
    """The API server's own message (RBAC denials name the missing verb and resource)."""
    message = exc.reason or ""
    if exc.body:
        try:
            message = json.loads(exc.body).get("message") or message
        except (ValueError, AttributeError):
            message = str(exc.body)[:300]
    return RuntimeError(f"Kubernetes API error {doing}: {exc.status} {message}".strip())


def _service_account_namespace() -> str:
    """The namespace this pod runs in (in a cluster), else `default`."""
    return _SA_NAMESPACE.read_text().strip() if _SA_NAMESPACE.is_file() else "default"


# ---- the cluster ---------------------------------------------------------------------------

class KubernetesCluster:
    """The API client (one per service process) and the runtimes placed through it."""

    def __init__(self, api: k8s.ApiClient, settings: InferenceSettings,
                 namespace: str) -> None:
        self.api = api
        self.settings = settings
        self.namespace = namespace
        self.runtimes: list[KubernetesRuntime] = []

    @classmethod
    async def connect(cls, settings: InferenceSettings) -> KubernetesCluster:
        """In-cluster service account, or the kubeconfig file WB_INFERENCE_K8S_KUBECONFIG."""
        cfg = k8s.Configuration()
        try:
            if settings.inference_k8s_kubeconfig:
                await config.load_kube_config(config_file=settings.inference_k8s_kubeconfig,
                                              client_configuration=cfg, persist_config=False)
            else:
                config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=cfg)
        except (ConfigException, OSError) as exc:
            raise RuntimeError(
                f"WB_INFERENCE_KUBERNETES is on but no cluster credentials were found ({exc}): "
                "run inside a cluster with a service account, or set "
                "WB_INFERENCE_K8S_KUBECONFIG") from exc
        namespace = settings.inference_k8s_namespace or _service_account_namespace()
        return cls(k8s.ApiClient(configuration=cfg), settings, namespace)

    def place(self, runtime: Runtime) -> KubernetesRuntime:
        placed = KubernetesRuntime(runtime, self.api, self.settings, self.namespace)
        self.runtimes.append(placed)
        return placed

    def detach(self) -> None:
        for runtime in self.runtimes:
            runtime.detach()

    async def close(self) -> None:
        self.detach()
        await self.api.close()
