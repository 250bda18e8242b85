"""The tail on a stock NVIDIA Triton server (`splitleak triton`): a model repository, Triton's venv, the server.

`splitleak triton repo DIR` writes a Triton model repository with one model per split of each exported model, named
as splitleak's cloud names it (`NAME.S`): `config.pbtxt` for Triton's Python backend, `1/model.py` running the tail
with ONNX Runtime, `1/model.onnx` (the tail), and `config.onnxruntime.pbtxt` beside it, the config a GPU or
production user swaps in for Triton's own ONNX Runtime backend (not on PyPI, so not run here).

The venv, the process group and the CLI's three actions are splitleak.cloud.engine's, shared with MLServer.

`splitleak triton venv` creates Triton's own venv (`make test` does, as `.venv-triton`): the `nvidia-pytriton` wheel
from PyPI, which bundles `tritonserver` and its Python backend, with numpy < 2 and onnxruntime. `splitleak triton
serve [DIR]` creates it if it is not there, writes the repository (into DIR, else a temporary folder) and runs
`tritonserver` on loopback gRPC only, in a process group of its own; it prints `triton listening on HOST:PORT serving
...` once every model is ready, and on SIGTERM or Ctrl-C stops the whole group (the server and its backend stubs).

Why the venv is Triton's own and the model file edits `sys.path`: with numpy 2 the Python backend silently returns
empty outputs (numpy 1.26 is fine), and the backend stub embeds the system's libpython and ignores PYTHONPATH, so
`model.py` puts the venv's site-packages first on its own path. The stub comes with the wheel for each Python
version; the one for this interpreter's version is copied beside the backend, where Triton looks for it.

What a stock server takes is what its config declares: FP32 `activation` of the split's shape. Defended forms
that change it (FP16, quantised levels, top-k channels) are refused by the device before the first frame
(splitleak.device.stream), and Triton returns none of splitleak's timing parameters, so the device reports the
round trip as "network + cloud".
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from splitleak.cloud import engine
from splitleak.cloud.engine import EngineError, site_packages
from splitleak.core import manifest

MAX_BATCH = 256  # as splitleak's cloud (splitleak.cloud.tail.MAX_BATCH)
EXIT_TIMEOUT_S = 5  # Triton waits 30 s for in-flight work on SIGTERM by default

_TYPES = {"FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "UINT8": "TYPE_UINT8"}

MODEL_PY = '''"""splitleak's tail {name} on Triton's Python backend: ONNX Runtime on model.onnx beside this file.
Written by `splitleak triton repo`."""

import os
import sys

# The backend stub runs the system's libpython and ignores PYTHONPATH: numpy (< 2) and onnxruntime come from Triton's
# own venv.
SITE_PACKAGES = {site_packages!r}
if SITE_PACKAGES not in sys.path:
    sys.path.insert(0, SITE_PACKAGES)

import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            activation = pb_utils.get_input_tensor_by_name(request, "activation").as_numpy()
            logits = self.session.run(["logits"], {{"activation": activation}})[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("logits", logits)]))
        return responses
'''


def config(name: str, split: manifest.Split, classes: int, backend: str) -> str:
    """A model's config.pbtxt for `backend` ("python" or "onnxruntime")."""
    dims = ", ".join(map(str, split.activation_shape))
    lines = [
        f'name: "{name}"',
        f'backend: "{backend}"',
        f"max_batch_size: {MAX_BATCH}",
        f'input [{{ name: "activation" data_type: {_TYPES[split.activation_datatype]} dims: [{dims}] }}]',
        f'output [{{ name: "logits" data_type: TYPE_FP32 dims: [{classes}] }}]',
    ]
    if backend == "onnxruntime":  # the production config: the same tail on Triton's own backend, on a GPU
        lines += ['default_model_filename: "model.onnx"', "instance_group [{ kind: KIND_GPU count: 1 }]"]
    else:
        lines += ["instance_group [{ kind: KIND_CPU count: 1 }]"]
    return "\n".join(lines) + "\n"


def server_files(venv: Path) -> tuple[Path, Path]:
    """(the tritonserver binary, its backends folder, with the Python backend's stub for this Python) in the venv."""
    root = site_packages(venv) / "pytriton" / "tritonserver"
    binary = root / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.exists() or not stub.exists():
        raise EngineError(f"{venv} has no tritonserver with a Python {version} backend stub (looked in {root})")
    # Where pytriton itself puts it: the stub finds its libraries by a path relative to its own folder.
    backends = root / "backends"
    if not (backends / "python" / stub.name).exists():
        shutil.copy2(stub, backends / "python" / stub.name)
    return binary, backends


class Triton(engine.Server):
    """A running `tritonserver`: gRPC only, on loopback, in a process group of its own with its backend stubs."""

    name = "triton"
    venv = Path(".venv-triton")
    requirements = ("nvidia-pytriton==0.7.0", "numpy<2", "onnxruntime>=1.20")
    exit_timeout_s = EXIT_TIMEOUT_S

    @classmethod
    def write_model(cls, folder: Path, name: str, m: manifest.Manifest, split: manifest.Split, venv: Path) -> None:
        (folder / "1").mkdir(exist_ok=True)
        shutil.copyfile(split.tail, folder / "1" / "model.onnx")
        py = MODEL_PY.format(name=name, site_packages=str(site_packages(venv.resolve())))
        (folder / "1" / "model.py").write_text(py)
        (folder / "config.pbtxt").write_text(config(name, split, len(m.classes), "python"))
        (folder / "config.onnxruntime.pbtxt").write_text(config(name, split, len(m.classes), "onnxruntime"))

    def command(self, port: int) -> list[str]:
        binary, backends = server_files(self.venv_path)
        return [
            str(binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--grpc-address={self.host}",
            f"--grpc-port={port}",
            "--allow-http=false",
            "--allow-metrics=false",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            "--disable-auto-complete-config",
        ]


def get_args_parser() -> argparse.ArgumentParser:
    return engine.get_args_parser(Triton, __doc__.splitlines()[0])


def main(args: argparse.Namespace) -> int:
    return engine.main(Triton, args)
