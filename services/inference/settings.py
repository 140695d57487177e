"""Settings of the inference service."""

from __future__ import annotations

from pydantic import Field

from workbench.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    # Where the user service answers (the org's token quota).
    user_url: str = "http://127.0.0.1:8001"
    # Replica health: how often each replica is checked, how long a check may take, how many
    # failed checks in a row fail the replica (it is then restarted).
    inference_health_interval_s: float = Field(default=2.0, gt=0)
    inference_health_timeout_s: float = Field(default=3.0, gt=0)
    inference_health_failures: int = Field(default=3, ge=1)
    # A replica that does not answer its health check this long after it was started failed.
    inference_start_timeout_s: float = Field(default=180.0, gt=0)
    # Restarts of a failing replica wait this long, doubling up to 60 s; after this many
    # restarts in a row the deployment is marked failed.
    inference_restart_backoff_s: float = Field(default=1.0, gt=0)
    inference_max_restarts: int = Field(default=5, ge=0)
    # Longest a proxied model request may take.
    inference_request_timeout_s: float = Field(default=600.0, gt=0)
    # Context window of local chat replicas (llama.cpp n_ctx) unless a deployment sets one.
    inference_default_n_ctx: int = Field(default=2048, ge=256, le=131072)
    # CPU threads per local chat replica (0: llama.cpp's choice).
    inference_worker_threads: int = Field(default=0, ge=0)
    # The org's token quota is re-read at most this often (a request past it is refused 429).
    inference_quota_cache_s: float = Field(default=2.0, ge=0)
    # What a model name resolves to and an org's safety rules are re-read at most this often
    # (changes made through this replica apply at once).
    inference_lookup_cache_s: float = Field(default=1.0, ge=0, le=60)
    # Usage events and quota updates of the calls finished within this window are written
    # together (one transaction, one quota update per org), off the requests' path.
    inference_usage_flush_s: float = Field(default=0.25, ge=0, le=10)
    # Start the replicas of deployments that were running when the service last stopped.
    inference_resume_deployments: bool = True
    # Kubernetes placement (docs/services/inference.md#kubernetes-placement): the `local` and
    # `vllm` runtimes run each deployment as a Deployment + Service instead of local processes.
    inference_kubernetes: bool = False
    # Namespace of the model workloads (empty: the service account's namespace, else default).
    inference_k8s_namespace: str = Field(
        default="", pattern=r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$")
    # The platform image (it has services.inference.worker and the built-in models): the local
    # runtime's pods; the vllm runtime's pods run the vLLM image.
    inference_k8s_image: str = ""
    inference_k8s_vllm_image: str = "vllm/vllm-openai:latest"
    # A kubeconfig file; empty: the in-cluster service account.
    inference_k8s_kubeconfig: str = ""
    # Replicas are reached at http://<name>.<namespace>.<domain>:8000 (the cluster's DNS).
    inference_k8s_service_domain: str = "svc.cluster.local"
    # The extended resource that `resources.gpu_count` requests (amd.com/gpu on AMD nodes).
    inference_k8s_gpu_resource: str = "nvidia.com/gpu"
    # vLLM pods may not download from the Hugging Face Hub (settings.model must be a path in
    # the image or on a volume); false lets them.
    inference_k8s_hf_offline: bool = True
    # The `triton` runtime (docs/services/inference.md#triton-runtime): the tritonserver binary
    # its replicas start when a deployment names no settings.url, that server's
    # --backend-directory (empty: its default, /opt/tritonserver/backends), and the Python
    # environment of the generated models (the Python backend's EXECUTION_ENV_PATH; empty: the
    # server's own Python, which must have the platform and its `inference` extra installed).
    inference_triton_server: str = "tritonserver"
    inference_triton_backend_directory: str = ""
    inference_triton_execution_env: str = ""
    # The rayserve runtime (docs/services/inference.md#rayserve-runtime): an existing Ray cluster
    # (`ray://head:10001` or `head:6379`); empty: one local Ray head of this service, started on
    # first use and stopped on shutdown.
    inference_ray_address: str = ""
    # Serve's HTTP proxy on that cluster (default http://<address host>:8000).
    inference_ray_serve_url: str = ""
    # The local head's logical CPUs (0: this machine's count) and object store size.
    inference_ray_num_cpus: int = Field(default=0, ge=0)
    inference_ray_object_store_mb: int = Field(default=256, ge=80)
    # Requests Serve hands one replica at once: the worker queues and batches them itself.
    inference_ray_max_ongoing_requests: int = Field(default=256, ge=1)
