"""The `rayserve` runtime: each replica is one Ray Serve application (`wb-<deployment>-<index>`,
route prefix of the same name) whose ingress is the worker's own FastAPI app, so errors, SSE
streaming, embedding batching and fair queueing are the `local` runtime's. Without
`WB_INFERENCE_RAY_ADDRESS` the service starts one Ray head of its own (`ray start --head
--block`, token authentication, free ports) on first use and stops it on shutdown.

The service's process never imports Ray: joining a cluster would put Ray's threads and gRPC
channels into its event loop's process and tie its life to the cluster's. Deploying and deleting
go through short driver processes (`python -m services.inference.rayserve_app`); health is the
app's `/health` through Serve's HTTP proxy, which answers 404 once the app is gone."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from services.inference.catalog import BUILTINS
from services.inference.runtimes.base import DeploymentSpec, Replica
from services.inference.settings import InferenceSettings
from workbench.devservers import free_port

log = logging.getLogger("services.inference")

DRIVER = [sys.executable, "-m", "services.inference.rayserve_app"]
# Ray puts its Unix sockets under the temp dir: <dir>/session_<date>_<pid>/sockets/plasma_store
# must stay within AF_UNIX's 107 bytes.
MAX_TEMP_DIR = 44
DRIVER_TIMEOUT_S = 120.0
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class RayServeReplica(Replica):
    app: str = ""
    deployed: bool = False
    gone: bool = False  # its last health check found no such app on the cluster
    deploy_error: str = ""
    deploying: asyncio.Task[None] | None = None

    def exited(self) -> int | None:
        """Non-None once the app failed to deploy: the supervisor then gives up on it at once
        (and replaces it) instead of waiting out the start timeout."""
        return 1 if self.deploy_error else None


@dataclass(frozen=True)
class RayCluster:
    address: str  # what ray.init(address=…) takes
    serve_url: str  # Serve's HTTP proxy
    dashboard_url: str | None = None


def _driver_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # The platform's secrets (WB_*) stay in the service: Ray processes do not need them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WB_")}
    env.update(OFFLINE_ENV)
    env.update(extra or {})
    return env


def _ray_binary() -> str:
    candidate = Path(sys.executable).parent / "ray"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ray")
    if not found:
        raise RuntimeError("the ray command is not installed next to this Python")
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class LocalRayHead:
    """The service's own single-node Ray cluster with Serve's HTTP proxy on 127.0.0.1. State
    (address, dashboard, proxy, pid) is written to `<state_dir>/head.json`; a head left running
    by a service that was killed is stopped by the next one."""

    def __init__(self, state_dir: Path, *, num_cpus: int, object_store_mb: int,
                 start_timeout_s: float) -> None:
        self.state_dir = state_dir
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.object_store_mb = object_store_mb
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.cluster: RayCluster | None = None
        self.token_path = state_dir / "auth_token"

    @property
    def log(self) -> Path:
        return self.state_dir / "head.log"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "head.json"

    def env(self) -> dict[str, str]:
        """Ray's token authentication: the GCS listens on every interface of this machine, so
        only processes given the token (ours) may use the cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def temp_dir(self) -> Path:
        preferred = (self.state_dir / "tmp").resolve()
        if len(str(preferred)) <= MAX_TEMP_DIR:
            return preferred
        digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"wb-ray-{digest}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        if not self.log.exists():
            return ""
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])

    def start(self) -> RayCluster:
        """Blocking: run in a thread."""
        self._stop_stale()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        temp = self.temp_dir()
        temp.mkdir(parents=True, exist_ok=True)
        link = self.state_dir / "tmp"
        if temp != link.resolve() and not link.exists():  # Ray's logs, found from the data dir
            link.symlink_to(temp, target_is_directory=True)
        marker = temp / "ray_current_cluster"
        marker.unlink(missing_ok=True)
        self.token_path.unlink(missing_ok=True)
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        gcs, dashboard, http = free_port(), free_port(), free_port()
        args = [*DRIVER, "head", "--", _ray_binary(), "start", "--head", "--block",
                f"--port={gcs}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                f"--num-cpus={self.num_cpus}",
                f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
                f"--temp-dir={temp}", "--disable-usage-stats"]
        # Every port of its own, free now: the defaults (6379, 8265, 10001…) collide with
        # Redis and with other Ray clusters on the machine.
        for flag in ("ray-client-server-port", "node-manager-port", "object-manager-port",
                     "metrics-export-port", "dashboard-agent-listen-port",
                     "dashboard-agent-grpc-port", "runtime-env-agent-port"):
            args.append(f"--{flag}={free_port()}")
        # Shutdown is ours: no 30 s drain of a node that goes away whole.
        env = _driver_env(self.env() | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.state_file.write_text(json.dumps({"pid": self.proc.pid, "temp_dir": str(temp)}))
        deadline = time.monotonic() + self.start_timeout_s
        while not marker.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with code {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray head did not start within "
                                   f"{self.start_timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.2)
        address = marker.read_text().strip()
        cluster = RayCluster(address, f"http://127.0.0.1:{http}",
                             f"http://127.0.0.1:{dashboard}")
        started = subprocess.run(
            [*DRIVER, "start", "--address", address, "--http-host", "127.0.0.1",
             "--http-port", str(http)], env=_driver_env(self.env()), capture_output=True,
            timeout=DRIVER_TIMEOUT_S, check=False)
        if started.returncode != 0:
            self.stop()
            raise RuntimeError("Serve did not start on the Ray head: "
                               + started.stderr.decode(errors="replace")[-1000:])
        self.state_file.write_text(json.dumps({
            "pid": self.proc.pid, "temp_dir": str(temp), "address": address,
            "serve_url": cluster.serve_url, "dashboard_url": cluster.dashboard_url,
            "token_path": str(self.token_path)}))
        self.cluster = cluster
        log.info("started a Ray head for the rayserve runtime at %s (Serve %s, dashboard %s)",
                 address, cluster.serve_url, cluster.dashboard_url)
        return cluster

    def stop(self, wait_s: float = 30.0) -> None:
        """Blocking. The keeper (`rayserve_app head`) stops `ray start --block`, which stops its
        Ray processes; it finishes on its own if we stop waiting first."""
        proc, self.proc, self.cluster = self.proc, None, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
        if proc.poll() is not None:
            _kill_group(proc.pid, signal.SIGKILL)  # nothing of it may stay behind
            self.state_file.unlink(missing_ok=True)

    def _stop_stale(self) -> None:
        try:
            state = json.loads(self.state_file.read_text())
            pid, temp = int(state["pid"]), str(state["temp_dir"])
        except (OSError, ValueError, KeyError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmdline = ""
        # Only the head this data dir started (same pid, its temp dir on the command line).
        if _alive(pid) and f"--temp-dir={temp}" in cmdline:
            log.warning("stopping the Ray head (pid %d) left by an earlier run", pid)
            _kill_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            _kill_group(pid, signal.SIGKILL)
        self.state_file.unlink(missing_ok=True)


class RayServeRuntime:
    """Settings as the local runtime (`n_ctx`, `threads`, `max_batch`, `batch_wait_ms`,
    `max_collect`); `resources.cpu` and `resources.gpu_count` become the Serve replica's
    `num_cpus` and `num_gpus`."""

    name = "rayserve"

    def __init__(self, state_dir: Path, log_dir: Path, *, address: str = "",
                 serve_url: str = "", default_n_ctx: int = 2048, threads: int = 0,
                 head_num_cpus: int = 0, object_store_mb: int = 256,
                 max_ongoing_requests: int = 256, start_timeout_s: float = 180.0) -> None:
        self.log_dir = log_dir
        self.address = address
        self.serve_url = serve_url.rstrip("/")
        self.default_n_ctx = default_n_ctx
        self.threads = threads
        self.max_ongoing_requests = max_ongoing_requests
        self.head: LocalRayHead | None = None if address else LocalRayHead(
            state_dir, num_cpus=head_num_cpus, object_store_mb=object_store_mb,
            start_timeout_s=start_timeout_s)
        self._attached: RayCluster | None = None
        self._lock = asyncio.Lock()
        self._replicas: dict[str, RayServeReplica] = {}
        self._closing = False

    @classmethod
    def from_settings(cls, settings: InferenceSettings) -> RayServeRuntime:
        root = settings.data_dir / "inference"
        return cls(root / "ray", root / "replicas", address=settings.inference_ray_address,
                   serve_url=settings.inference_ray_serve_url,
                   default_n_ctx=settings.inference_default_n_ctx,
                   threads=settings.inference_worker_threads,
                   head_num_cpus=settings.inference_ray_num_cpus,
                   object_store_mb=settings.inference_ray_object_store_mb,
                   max_ongoing_requests=settings.inference_ray_max_ongoing_requests,
                   start_timeout_s=settings.inference_start_timeout_s)

    # ---- what a replica runs -----------------------------------------------------------------

    @staticmethod
    def app_name(spec: DeploymentSpec, index: int) -> str:
        return f"wb-{spec.id}-{index}"

    def worker_args(self, spec: DeploymentSpec) -> list[str]:
        """The worker's command line (services.inference.worker), the model named by its
        catalog name: its files are found on the Ray node that runs the replica."""
        name = spec.model.removeprefix("builtin:")
        if name not in BUILTINS:
            raise ValueError(f"the rayserve runtime serves built-in models; {spec.model!r} "
                             "is not one")
        model = BUILTINS[name]
        args = ["--kind", model.kind, "--model", f"builtin:{name}", "--model-name", spec.name,
                "--port", "0"]
        if model.kind == "chat":
            args += ["--n-ctx", str(int(spec.settings.get("n_ctx") or self.default_n_ctx))]
            threads = int(spec.settings.get("threads") or spec.resources.get("cpu") or
                          self.threads or 0)
            if threads:
                args += ["--threads", str(threads)]
        else:
            for key in ("max_batch", "batch_wait_ms", "max_collect"):
                if spec.settings.get(key):
                    args += [f"--{key.replace('_', '-')}", str(spec.settings[key])]
        return args

    def deploy_args(self, spec: DeploymentSpec, index: int, address: str) -> list[str]:
        app = self.app_name(spec, index)
        return ["deploy", "--address", address, "--app", app, "--route-prefix", f"/{app}",
                "--num-cpus", str(float(spec.resources.get("cpu") or 1)),
                "--num-gpus", str(float(spec.resources.get("gpu_count") or 0)),
                "--max-ongoing-requests", str(self.max_ongoing_requests),
                "--", *self.worker_args(spec)]

    # ---- the cluster -------------------------------------------------------------------------

    async def cluster(self) -> RayCluster:
        async with self._lock:
            if self._closing:
                raise RuntimeError("the inference service is shutting down")
            if self.head is not None:
                if self.head.cluster is None or not self.head.alive():
                    if self.head.proc is not None:  # it died: start a new one
                        await asyncio.to_thread(self.head.stop)
                    return await asyncio.to_thread(self.head.start)
                return self.head.cluster
            if self._attached is None:
                self._attached = await self._attach()
            return self._attached

    async def _attach(self) -> RayCluster:
        host = urlsplit("//" + self.address.split("://")[-1]).hostname or "127.0.0.1"
        serve_url = self.serve_url or f"http://{host}:8000"
        port = urlsplit(serve_url).port or 8000
        # Starts Serve with its proxy on every node's port `port` unless it already runs.
        rc, out = await self._driver(["start", "--address", self.address, "--http-host",
                                      "0.0.0.0", "--http-port", str(port)], None)
        if rc != 0:
            raise RuntimeError(f"cannot reach Ray Serve on {self.address}: {out}")
        return RayCluster(self.address, serve_url)

    def _env(self) -> dict[str, str]:
        return _driver_env(self.head.env() if self.head is not None else None)

    async def _driver(self, args: list[str], log: Path | None) -> tuple[int, str]:
        """Runs one driver command, its output appended to `log`; returns its exit code and its
        last line of output (a failure's reason). Cancelling the caller kills the driver."""
        if log is None:
            log = self.log_dir / "rayserve.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            out.write(f"--- rayserve_app {' '.join(args[:5])}\n".encode())
            out.flush()
            start = out.tell()
            proc = await asyncio.create_subprocess_exec(
                *DRIVER, *args, stdout=out, stderr=subprocess.STDOUT, env=self._env(),
                start_new_session=True)
            try:
                await asyncio.wait_for(proc.wait(), DRIVER_TIMEOUT_S)
            except (asyncio.CancelledError, TimeoutError):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                raise
        with log.open("rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").strip().splitlines()
        return proc.returncode or 0, lines[-1] if lines else ""

    # ---- the Runtime protocol -----------------------------------------------------------------

    async def launch(self, spec: DeploymentSpec, index: int) -> Replica:
        if importlib.util.find_spec("ray") is None:
            raise RuntimeError("Ray Serve is not installed in the inference service's "
                               "environment: pip install 'ray[serve]>=2.47'")
        if self._closing:
            raise RuntimeError("the inference service is shutting down")
        self.worker_args(spec)  # raises now for a model it cannot serve
        app = self.app_name(spec, index)
        replica = RayServeReplica(spec.id, index, "", app=app,
                                  log=self.log_dir / f"{spec.id}-{index}.log")
        replica.deploying = asyncio.create_task(self._deploy(spec, replica),
                                                name=f"rayserve-deploy-{app}")
        self._replicas[app] = replica
        return replica

    async def _deploy(self, spec: DeploymentSpec, replica: RayServeReplica) -> None:
        try:
            cluster = await self.cluster()
            replica.base_url = f"{cluster.serve_url}/{replica.app}/v1"
            assert replica.log is not None
            rc, tail = await self._driver(
                self.deploy_args(spec, replica.index, cluster.address), replica.log)
            if rc != 0:
                replica.deploy_error = tail or f"the deploy driver exited with code {rc}"
            else:
                replica.deployed = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            replica.deploy_error = str(exc) or type(exc).__name__

    async def health(self, replica: Replica, client: httpx.AsyncClient) -> dict[str, Any]:
        assert isinstance(replica, RayServeReplica)
        if replica.deploy_error:
            raise RuntimeError(replica.deploy_error)
        if self.head is not None and self.head.proc is not None and not self.head.alive():
            raise RuntimeError(f"the Ray head exited: {self.head.log_tail()}")
        if not replica.deployed:
            raise RuntimeError(f"the Serve application {replica.app} is being deployed")
        r = await client.get(replica.base_url.removesuffix("/v1") + "/health")
        replica.gone = r.status_code == 404
        if replica.gone:
            raise RuntimeError(f"the Serve application {replica.app} is not on the Ray cluster "
                               "any more (its route answers 404)")
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    async def stop(self, replica: Replica) -> None:
        assert isinstance(replica, RayServeReplica)
        self._replicas.pop(replica.app, None)
        task, replica.deploying = replica.deploying, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._closing or not replica.base_url or replica.gone:  # nothing there to delete
            return
        if self.head is not None and not self.head.alive():  # its apps went with it
            return
        cluster = self.head.cluster if self.head is not None else self._attached
        if cluster is None:
            return
        try:
            rc, tail = await self._driver(["delete", "--address", cluster.address,
                                           "--app", replica.app], replica.log)
            if rc != 0:
                log.warning("deleting the Serve application %s failed: %s", replica.app, tail)
        except Exception as exc:  # the supervisor goes on; the app is retried on next stop
            log.warning("deleting the Serve application %s failed: %s", replica.app, exc)

    async def close(self) -> None:
        """Call on shutdown, before the supervisor closes: the local head goes with its apps;
        on an attached cluster this service's apps are deleted in one driver call."""
        self._closing = True  # no new head, deploy or delete from now on
        replicas = list(self._replicas.values())
        self._replicas.clear()
        tasks = [r.deploying for r in replicas if r.deploying and not r.deploying.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.head is not None:  # a shutdown must not wait long: the head finishes alone
            await asyncio.to_thread(self.head.stop, 8.0)
        elif self._attached is not None and replicas:
            args = ["delete", "--address", self._attached.address]
            for r in replicas:
                args += ["--app", r.app]
            with contextlib.suppress(Exception):
                await self._driver(args, None)
