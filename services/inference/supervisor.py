"""Keeps each deployment's replicas alive in this process: one keeper task per replica starts it,
waits until it answers its health check, checks it every few seconds, and replaces it when its
process dies or its checks keep failing (with backoff; a replica that never comes up fails the
deployment with the reason). Requests go to the ready replica with the fewest in flight."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from services.inference.metrics import Metrics
from services.inference.runtimes.base import DeploymentSpec, Replica, Runtime
from services.inference.settings import InferenceSettings

log = logging.getLogger("services.inference")
StatusCallback = Callable[[str, str, str], Awaitable[None]]  # deployment id, status, reason


class NoReplica(Exception):
    """No ready replica can take the request (the message says why)."""


@dataclass
class _Deployment:
    spec: DeploymentSpec
    runtime: Runtime
    replicas: dict[int, Replica] = field(default_factory=dict)
    keepers: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    status: str = "deploying"
    reason: str = ""


class Supervisor:
    def __init__(self, settings: InferenceSettings, runtimes: dict[str, Runtime],
                 on_status: StatusCallback, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtimes = runtimes
        self.on_status = on_status
        self.deployments: dict[str, _Deployment] = {}
        self._http = httpx.AsyncClient(timeout=settings.inference_health_timeout_s,
                                       trust_env=False)

    # ---- lifecycle -------------------------------------------------------------------------

    async def deploy(self, spec: DeploymentSpec) -> None:
        if spec.id in self.deployments:
            await self.stop(spec.id, report=False)
        runtime = self.runtimes.get(spec.runtime)
        if runtime is None:
            raise ValueError(f"runtime {spec.runtime!r} is not available here")
        dep = _Deployment(spec, runtime)
        self.deployments[spec.id] = dep
        await self._set_status(dep, "deploying", "")
        for index in range(spec.replicas):
            self._keep(dep, index)

    def _keep(self, dep: _Deployment, index: int) -> None:
        dep.keepers[index] = asyncio.create_task(self._keeper(dep, index),
                                                 name=f"replica-{dep.spec.id}-{index}")

    async def scale(self, deployment_id: str, replicas: int) -> None:
        dep = self.deployments.get(deployment_id)
        if dep is None:
            return
        dep.spec.replicas = replicas
        for index in sorted(dep.keepers):
            if index >= replicas:
                await self._stop_replica(dep, index)
        for index in range(replicas):
            if index not in dep.keepers:
                self._keep(dep, index)
        await self._refresh(dep)

    async def stop(self, deployment_id: str, *, report: bool = True) -> None:
        dep = self.deployments.pop(deployment_id, None)
        if dep is None:
            return
        for index in list(dep.keepers):
            await self._stop_replica(dep, index)
        if report:
            await self.on_status(deployment_id, "stopped", "")

    async def _stop_replica(self, dep: _Deployment, index: int) -> None:
        task = dep.keepers.pop(index, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        replica = dep.replicas.pop(index, None)
        if replica is not None:
            replica.status = "stopped"
            await dep.runtime.stop(replica)

    async def close(self) -> None:
        for deployment_id in list(self.deployments):
            await self.stop(deployment_id, report=False)
        await self._http.aclose()

    # ---- one replica -------------------------------------------------------------------------

    async def _keeper(self, dep: _Deployment, index: int) -> None:
        s = self.settings
        attempts = 0
        while True:
            replica: Replica | None = None
            try:
                replica = await dep.runtime.launch(dep.spec, index)
                replica.restarts = attempts
                dep.replicas[index] = replica
                await self._refresh(dep)
                await self._wait_ready(dep, replica)
                attempts = 0
                replica.status = "ready"
                replica.failures = 0
                await self._refresh(dep)
                await self._watch(dep, replica)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
                if replica is not None:
                    replica.status, replica.last_error = "failed", reason
                    await dep.runtime.stop(replica)
                log.warning("replica %s/%d of deployment %s failed: %s", dep.spec.name, index,
                            dep.spec.id, reason)
                attempts += 1
                if attempts > s.inference_max_restarts:
                    dep.reason = (f"replica {index} failed {attempts} times in a row; "
                                  f"last: {reason}")
                    await self._refresh(dep, give_up=True)
                    return
                await self._refresh(dep)
                await asyncio.sleep(min(60.0, s.inference_restart_backoff_s * 2 ** (attempts - 1)))

    async def _wait_ready(self, dep: _Deployment, replica: Replica) -> None:
        deadline = time.monotonic() + self.settings.inference_start_timeout_s
        last = ""
        while True:
            try:
                info = await dep.runtime.health(replica, self._http)
                replica.queue_depth = int(info.get("queue_depth", 0) or 0)
                return
            except Exception as exc:
                last = str(exc) or type(exc).__name__
                if replica.exited() is not None:
                    raise RuntimeError(last) from exc
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready within {self.settings.inference_start_timeout_s:.0f}"
                                   f" s: {last}")
            await asyncio.sleep(0.25)

    async def _watch(self, dep: _Deployment, replica: Replica) -> None:
        """Returns (raises) when the replica must be replaced."""
        s = self.settings
        while True:
            await asyncio.sleep(s.inference_health_interval_s)
            try:
                info = await dep.runtime.health(replica, self._http)
                replica.queue_depth = int(info.get("queue_depth", 0) or 0)
                if self.metrics is not None:
                    self.metrics.queue_depth(dep.spec.id, sum(
                        r.queue_depth for r in dep.replicas.values()))
                replica.failures = 0
                if replica.status != "ready":
                    replica.status = "ready"
                    await self._refresh(dep)
            except Exception as exc:
                replica.failures += 1
                replica.last_error = str(exc) or type(exc).__name__
                if replica.exited() is not None or replica.failures >= s.inference_health_failures:
                    raise RuntimeError(replica.last_error) from exc

    def mark_broken(self, replica: Replica, reason: str) -> None:
        """A request found the replica gone: stop sending it requests until it is checked."""
        replica.status, replica.last_error = "failed", reason

    # ---- status ----------------------------------------------------------------------------

    async def _refresh(self, dep: _Deployment, *, give_up: bool = False) -> None:
        if give_up:
            await self._set_status(dep, "failed", dep.reason)
        elif any(r.status == "ready" for r in dep.replicas.values()):
            await self._set_status(dep, "running", "")
        else:
            await self._set_status(dep, "deploying", dep.reason)

    async def _set_status(self, dep: _Deployment, status: str, reason: str) -> None:
        """Report a change of the deployment's status (the service persists it)."""
        if status == dep.status and status != "failed":
            return
        dep.status, dep.reason = status, reason
        try:
            await self.on_status(dep.spec.id, status, reason)
        except Exception:
            log.exception("recording the status of deployment %s failed", dep.spec.id)

    # ---- routing ---------------------------------------------------------------------------

    def pick(self, deployment_id: str) -> Replica:
        dep = self.deployments.get(deployment_id)
        if dep is None:
            raise NoReplica("the deployment is not running; start it first")
        ready = [r for r in dep.replicas.values() if r.status == "ready"]
        if not ready:
            detail = dep.reason or "its replicas are starting or being replaced"
            raise NoReplica(f"no replica of {dep.spec.name!r} is ready ({detail})")
        return min(ready, key=lambda r: (r.inflight, r.queue_depth, r.index))

    def replicas(self, deployment_id: str) -> list[Replica]:
        dep = self.deployments.get(deployment_id)
        return [dep.replicas[i] for i in sorted(dep.replicas)] if dep else []
