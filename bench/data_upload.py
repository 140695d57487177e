"""Upload throughput: a 500 MB CSV file uploaded through the gateway and the data service
(distributed mode: each its own process, streamed body, checksum, format check and analysis,
stored in S3) versus a plain copy of the same file into the same S3 server with the `minio`
client's `fput_object`. Same run, same machine, same SeaweedFS.

    .venv/bin/python bench/data_upload.py [--mb 500] [--rounds 2]

Each figure is MB/s from the first byte sent until the upload is answered (the version is
recorded, the object stored) or `fput_object` returns. Rounds alternate plain and platform; the
best round of each is compared. Target: platform / plain >= 0.60.

Starts its own NATS, SeaweedFS, user + data services and gateway on a fresh PostgreSQL database
(127.0.0.1:5432, user postgres) and removes all of it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from minio import Minio

from workbench.testing import (
    NatsServer,
    SeaweedServer,
    ServerProcess,
    create_pg_database,
    drop_pg_database,
    free_port,
    register,
    wait_http,
)

WB = [sys.executable, "-m", "services.cli"]
REPO = Path(__file__).resolve().parents[1]
SECRET = "bench-secret-key-0123456789abcdef"
INTERNAL = "bench-internal-token-0123456789ab"


def make_csv(path: Path, size: int) -> None:
    row = b",customer name,12345.67,2026-11-23," + b"x" * 60 + b"\n"
    with path.open("wb") as f:
        f.write(b"id,name,amount,day,comment\n")
        n, written, block = 0, 0, bytearray()
        while written < size:
            while len(block) < (4 << 20):
                n += 1
                block += str(n).encode() + row
            f.write(block)
            written += len(block)
            block.clear()


def file_chunks(path: Path) -> object:
    def gen() -> object:
        with path.open("rb") as f:
            while data := f.read(1 << 20):
                yield data
    return gen()


def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="wb-bench-upload-"))
    nats = NatsServer(workdir / "nats")
    s3 = SeaweedServer(workdir / "s3")
    procs: list[ServerProcess] = []
    db_name = None
    try:
        nats.start()
        s3.start()
        db_name, db_url = asyncio.run(create_pg_database("wb_bench_upload"))
        user_port, data_port, gw_port = free_port(), free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("WB_")}
        env.update(s3.env(bucket="wb-bench-upload"))
        env.update({
            "WB_MODE": "distributed", "WB_DATA_DIR": str(workdir / "data"),
            "WB_DATABASE_URL": db_url, "WB_NATS_URL": nats.url, "WB_SECRET_KEY": SECRET,
            "WB_INTERNAL_TOKEN": INTERNAL, "WB_ACCESS_LOG": "false", "WB_LOG_LEVEL": "WARNING",
            "WB_RATE_LIMIT_ENABLED": "false", "WB_REDIS_URL": "redis://127.0.0.1:6379/15",
            "WB_USER_URL": f"http://127.0.0.1:{user_port}",
            "WB_UPSTREAMS": f'{{"user": "http://127.0.0.1:{user_port}", '
                            f'"data": "http://127.0.0.1:{data_port}"}}',
            "WB_JWKS_URL": f"http://127.0.0.1:{user_port}/.well-known/jwks.json",
        })
        subprocess.run([*WB, "migrate", "user", "data"], env=env, check=True, cwd=REPO)
        for name, port in (("user", user_port), ("data", data_port), ("gateway", gw_port)):
            p = ServerProcess([*WB, "serve", name, "--port", str(port)], env=env,
                              log=workdir / f"{name}.log").start()
            procs.append(p)
            wait_http(f"http://127.0.0.1:{port}/readyz", proc=p.proc, log=p.log, timeout=60)
        measure(args, workdir, env, f"http://127.0.0.1:{gw_port}")
    finally:
        for p in reversed(procs):
            p.stop()
        if db_name:
            asyncio.run(drop_pg_database(db_name))
        s3.stop()
        nats.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def measure(args: argparse.Namespace, workdir: Path, env: dict[str, str], gateway: str) -> None:
    path = workdir / "upload.csv"
    make_csv(path, args.mb * 1_000_000)
    size = path.stat().st_size
    mc = Minio(env["WB_S3_ENDPOINT"].removeprefix("http://"), access_key=env["WB_S3_ACCESS_KEY"],
               secret_key=env["WB_S3_SECRET_KEY"], secure=False)
    bucket = env["WB_S3_BUCKET"]
    if not mc.bucket_exists(bucket):
        mc.make_bucket(bucket)
    with httpx.Client(base_url=gateway, timeout=600.0) as client:
        owner = register(client)
        project = client.post("/api/v1/projects", json={"name": "bench"},
                              headers=owner.headers).json()
        print(f"file: {size / 1e6:.0f} MB CSV; S3: SeaweedFS; {args.rounds} round(s)")
        plain, platform = [], []
        for r in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            mc.fput_object(bucket, f"plain/{r}.csv", str(path), content_type="text/csv")
            plain.append(size / 1e6 / (time.perf_counter() - t0))
            print(f"round {r} plain fput_object        : {plain[-1]:7.1f} MB/s")
            d = client.post("/api/v1/datasets", headers=owner.headers,
                            json={"project_id": project["id"], "name": f"bench-{r}"}).json()
            t0 = time.perf_counter()
            resp = client.post(f"/api/v1/datasets/{d['id']}/versions",
                               params={"filename": "upload.csv"},
                               headers={**owner.headers,
                                        "content-type": "application/octet-stream",
                                        "content-length": str(size)},
                               content=file_chunks(path))  # type: ignore[arg-type]
            took = time.perf_counter() - t0
            if resp.status_code != 201:
                raise SystemExit(f"upload failed: {resp.status_code} {resp.text}")
            platform.append(size / 1e6 / took)
            print(f"round {r} gateway + data service : {platform[-1]:7.1f} MB/s "
                  f"({resp.json()['row_count']:,} rows analysed)")
            mc.remove_object(bucket, f"plain/{r}.csv")
        ratio = max(platform) / max(plain)
        print(f"\nplain copy (minio fput_object)      : {max(plain):7.1f} MB/s")
        print(f"through gateway + data service      : {max(platform):7.1f} MB/s")
        print(f"ratio platform / plain              : {ratio:7.2f}  (target >= 0.60: "
              f"{'met' if ratio >= 0.6 else 'NOT met'})")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--mb", type=int, default=500, help="file size in MB")
    p.add_argument("--rounds", type=int, default=2)
    return p.parse_args()


if __name__ == "__main__":
    main(parse())
