"""The Ray Serve side of the `rayserve` runtime. Each replica of a deployment is one Serve
application whose ingress is the worker's own FastAPI app (services.inference.worker), built on
the Serve replica from the same arguments a local worker process gets. The runtime drives the
cluster through this module as short-lived driver processes, so the inference service's own
process never joins a Ray cluster:

    python -m services.inference.rayserve_app head -- RAY START ARGS   (the local head's keeper)
    python -m services.inference.rayserve_app start  --address A --http-host H --http-port P
    python -m services.inference.rayserve_app deploy --address A --app NAME [options] -- WORKER ARGS
    python -m services.inference.rayserve_app delete --address A --app NAME
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
BUILTIN_PREFIX = "builtin:"


def asgi_builder(worker_argv: list[str]) -> Callable[[], Any]:
    """The function Serve calls on each replica to get its ASGI app: the worker's app around an
    engine loaded there. `--model builtin:<name>` is resolved on the replica's node, where the
    platform's model packages are installed."""

    def build_worker_app() -> Any:
        os.environ.update(OFFLINE_ENV)  # before sentence-transformers is imported
        from pathlib import Path

        from services.inference.catalog import BUILTINS
        from services.inference.worker import create_app, load_engine, parse_args

        said = io.StringIO()
        try:  # argparse exits: its message would end as "ActorDiedError" in Serve's status
            with contextlib.redirect_stderr(said):
                args = parse_args(worker_argv)
        except SystemExit:
            lines = said.getvalue().strip().splitlines() or ["invalid worker arguments"]
            raise ValueError(lines[-1]) from None
        model = str(args.model)
        if model.startswith(BUILTIN_PREFIX):
            args.model = Path(BUILTINS[model.removeprefix(BUILTIN_PREFIX)].path())
        return create_app(load_engine(args))

    return build_worker_app


def head(args: argparse.Namespace) -> int:
    """Keeps `ray start --head --block …` (which stops its Ray processes on SIGTERM) for the
    service that started this: stops it on SIGTERM, and also when that service is gone (killed,
    crashed), so a local head never outlives it. Whatever is left of this process group
    afterwards (workers, Serve actors) is killed."""
    parent = os.getppid()
    ray_args = [a for a in args.ray_args if a != "--"]
    proc = subprocess.Popen(ray_args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while proc.poll() is None and not stop.is_set() and os.getppid() == parent:
        stop.wait(1.0)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    _kill_group_but_me()
    return proc.wait()


def _kill_group_but_me() -> None:
    me, group = os.getpid(), os.getpgid(0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if os.getpgid(int(entry.name)) == group:
                os.kill(int(entry.name), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


def _connect(address: str) -> None:
    import ray

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
             configure_logging=True)


def start(args: argparse.Namespace) -> int:
    """Starts Serve on the cluster with its HTTP proxy where the runtime will look for it (a
    no-op, with Ray's warning, when Serve already runs there)."""
    from ray import serve

    _connect(args.address)
    serve.start(http_options={"host": args.http_host, "port": args.http_port,
                              "keep_alive_timeout_s": args.keep_alive_s})
    return 0


def deploy(args: argparse.Namespace) -> int:
    """Deploys one application and waits until it runs; a replica that cannot start (the model
    fails to load) makes Serve mark it DEPLOY_FAILED and this exit 1 with Serve's message."""
    from ray import serve

    worker_argv = list(args.worker_args)
    if worker_argv[:1] == ["--"]:
        worker_argv = worker_argv[1:]
    actor_options: dict[str, Any] = {"num_cpus": args.num_cpus}
    if args.num_gpus:
        actor_options["num_gpus"] = args.num_gpus
    deployment: Any = serve.deployment(
        serve.ingress(asgi_builder(worker_argv))(), name="replica",
        num_replicas=1, ray_actor_options=actor_options,
        # The worker queues fairly between organizations and batches embeddings itself: Serve
        # must hand it every request at once rather than hold them back in its own queue.
        max_ongoing_requests=args.max_ongoing_requests,
        health_check_period_s=5, graceful_shutdown_timeout_s=10)
    _connect(args.address)
    try:
        serve.run(deployment.bind(), name=args.app, route_prefix=args.route_prefix)
    except RuntimeError as exc:
        print(f"the Serve application {args.app} failed to deploy: {exc}"
              f"{_failure_reason(args.app)}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps({"app": args.app, "route_prefix": args.route_prefix, "status": "RUNNING"}))
    return 0


def _failure_reason(app: str) -> str:
    """The last line of the failed deployment's message (its replica's exception), which
    Serve's own error does not carry."""
    from ray import serve

    try:
        status = serve.status().applications[app]
    except Exception:
        return ""
    for deployment in status.deployments.values():
        lines = [line for line in str(deployment.message or "").splitlines() if line.strip()]
        if lines:
            return f" ({lines[-1].strip()})"
    return ""


def delete(args: argparse.Namespace) -> int:
    from ray import serve

    _connect(args.address)
    for app in args.app:
        serve.delete(app)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.inference.rayserve_app",
                                description="Deploy workbench model replicas on Ray Serve.")
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("head", help="run and keep a local Ray head: -- ray start --head --block …")
    h.add_argument("ray_args", nargs=argparse.REMAINDER)
    s = sub.add_parser("start", help="start Serve and its HTTP proxy on the cluster")
    s.add_argument("--http-host", default="127.0.0.1")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--keep-alive-s", type=int, default=60)
    d = sub.add_parser("deploy", help="deploy one replica as a Serve application")
    d.add_argument("--app", required=True)
    d.add_argument("--route-prefix", required=True)
    d.add_argument("--num-cpus", type=float, default=1.0)
    d.add_argument("--num-gpus", type=float, default=0.0)
    d.add_argument("--max-ongoing-requests", type=int, default=256)
    d.add_argument("worker_args", nargs=argparse.REMAINDER,
                   help="after --: the arguments of python -m services.inference.worker")
    x = sub.add_parser("delete", help="delete Serve applications")
    x.add_argument("--app", required=True, action="append")
    for q in (s, d, x):
        q.add_argument("--address", required=True, help="the Ray cluster (host:port, ray://…)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "head": head, "start": start, "deploy": deploy, "delete": delete}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
