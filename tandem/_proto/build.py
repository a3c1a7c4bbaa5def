"""Generate `tandem/v1/*_pb2*.py` from `protos/tandem/v1/*.proto` with grpcio-tools.

Run `python -m tandem._proto.build` (or import `tandem.v1`, which builds when the generated code is
missing or older than the .proto files). A stamp holds the sha256 of the sources it was built from.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
SOURCES = ("tandem/v1/orchestrator.proto", "tandem/v1/worker.proto")
OUT = ROOT / "tandem" / "v1"
STAMP = OUT / "_build_stamp.txt"
GENERATED = ("orchestrator_pb2.py", "orchestrator_pb2.pyi", "orchestrator_pb2_grpc.py",
             "worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py")


def sources_digest() -> str:
    h = hashlib.sha256()
    for rel in SOURCES:
        h.update(rel.encode() + b"\0" + (PROTO_ROOT / rel).read_bytes())
    return h.hexdigest()


def generate(out_root: Path) -> None:
    """Write the generated package `tandem/v1/` under `out_root`."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *SOURCES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {SOURCES}")


def is_stale() -> bool:
    if not PROTO_ROOT.is_dir():
        return False
    if not all((OUT / name).is_file() for name in GENERATED) or not STAMP.is_file():
        return True
    return STAMP.read_text().strip() != sources_digest()


def build() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in GENERATED:
            data = (Path(tmp) / "tandem" / "v1" / name).read_bytes()
            target = OUT / name
            part = target.with_suffix(target.suffix + f".{os.getpid()}.tmp")
            part.write_bytes(data)
            os.replace(part, target)
    STAMP.write_text(sources_digest() + "\n")


def ensure_built() -> None:
    if is_stale():
        build()


if __name__ == "__main__":
    build()
    print(f"generated {len(GENERATED)} files in {OUT}", file=sys.stderr)
