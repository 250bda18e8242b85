"""Generate the Python stubs of protos/inference.proto: `python -m splitleak.protogen [OUT_DIR]`.

The proto is compiled under the virtual path `splitleak/protos/`, so the generated modules import each other as
`splitleak.protos.inference_pb2` (the package that protos/ is installed as) instead of a bare top-level name.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[1] / "protos"
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def generate(out_dir: Path = PROTO_DIR, *, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile `proto_dir`/inference.proto into `out_dir`; returns the stubs written there."""
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-Isplitleak/protos={proto_dir}",
            f"-I{protoc._get_resource_file_name('grpc_tools', '_proto')}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            "splitleak/protos/inference.proto",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(Path(tmp) / "splitleak" / "protos" / name, out_dir / name)) for name in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
