"""Compile every .proto under proto/ into the committed descriptor set proto/descriptors.binpb.

`python scripts/gen_proto.py` regenerates it; `--check` fails when the committed one is stale.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "proto"
DESCRIPTOR_SET = PROTO_DIR / "descriptors.binpb"


def proto_files() -> list[str]:
    # Sorted and relative to proto/ so the output does not depend on the filesystem or cwd.
    return sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))


def well_known_include() -> Path:
    """The google/protobuf/*.proto files bundled with grpcio-tools (a dev dependency)."""
    try:
        return Path(str(resources.files("grpc_tools") / "_proto"))
    except ModuleNotFoundError:
        sys.exit("grpcio-tools is not installed: pip install -e '.[dev]' (it provides protoc)")


def compile_descriptor_set(out: Path) -> None:
    files = proto_files()
    if not files:
        sys.exit(f"no .proto files under {PROTO_DIR}")
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_DIR}", f"-I{well_known_include()}",
        f"--descriptor_set_out={out}", "--include_imports",
        *files,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=PROTO_DIR, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"protoc failed (exit {result.returncode}):\n{result.stderr.strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary file and exit 1 if proto/descriptors.binpb differs",
    )
    args = parser.parse_args(argv)
    rel = DESCRIPTOR_SET.relative_to(REPO)
    if not args.check:
        compile_descriptor_set(DESCRIPTOR_SET)
        print(f"wrote {rel} from {len(proto_files())} .proto files")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "descriptors.binpb"
        compile_descriptor_set(fresh)
        committed = DESCRIPTOR_SET.read_bytes() if DESCRIPTOR_SET.exists() else None
        if committed != fresh.read_bytes():
            state = "is missing" if committed is None else "is out of date with proto/"
            print(
                f"{rel} {state}: run `make proto` (python scripts/gen_proto.py) and commit it",
                file=sys.stderr,
            )
            return 1
    print(f"{rel} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
