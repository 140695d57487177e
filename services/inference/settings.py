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
    # Start the replicas of deployments that were running when the service last stopped.
    inference_resume_deployments: bool = True
