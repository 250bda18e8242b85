"""The tail on a stock NVIDIA Triton server (`splitleak triton`): a model repository, Triton's venv, the server.

`splitleak triton repo DIR` writes a Triton model repository with one model per split of each exported model, named
as splitleak's cloud names it (`NAME.S`): `config.pbtxt` for Triton's Python backend, `1/model.py` running the tail
with ONNX Runtime, `1/model.onnx` (the tail), and `config.onnxruntime.pbtxt` beside it, the config a GPU or
production user swaps in for Triton's own ONNX Runtime backend (not on PyPI, so not run here).

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
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from splitleak.cloud.tail import add_models_argument
from splitleak.core import manifest, transport
from splitleak.core.options import number
from splitleak.core.process import dies_with_parent
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc

VENV = Path(".venv-triton")  # where `make` builds it, at the repository's root
REQUIREMENTS = ("nvidia-pytriton==0.7.0", "numpy<2", "onnxruntime>=1.20")
MAX_BATCH = 256  # as splitleak's cloud (splitleak.cloud.tail.MAX_BATCH)
EXIT_TIMEOUT_S = 5  # Triton waits 30 s for in-flight work on SIGTERM by default
START_S = 120.0  # loading four Python-backend models on a busy 2-core machine takes seconds

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


class TritonError(RuntimeError):
    """Triton cannot be set up or started here: the message says why."""


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


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def write_repo(out: Path, models: list[Path], venv: Path = VENV) -> list[str]:
    """Write the model repository for every split of `models` into `out`; the names of the models written."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for root in models:
        m = manifest.load(root)
        for split in m.splits.values():
            name = m.served_name(split.name)
            version = out / name / "1"
            version.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(split.tail, version / "model.onnx")
            py = MODEL_PY.format(name=name, site_packages=str(site_packages(venv.resolve())))
            (version / "model.py").write_text(py)
            (out / name / "config.pbtxt").write_text(config(name, split, len(m.classes), "python"))
            (out / name / "config.onnxruntime.pbtxt").write_text(config(name, split, len(m.classes), "onnxruntime"))
            names.append(name)
    return names


def ensure_venv(venv: Path = VENV, say=lambda line: None) -> None:
    """Create Triton's venv with REQUIREMENTS unless it has them (its `.installed` lists what it was made with)."""
    marker = venv / ".installed"
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        return
    say(f"creating Triton's venv in {venv} ({', '.join(REQUIREMENTS)}): a minute or two")
    for cmd in (
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = " ".join((done.stderr or done.stdout).strip().splitlines()[-1:])
            raise TritonError(f"could not create Triton's venv in {venv}: {' '.join(cmd[:3])}...: {last}")
    marker.write_text(wanted)


def server_files(venv: Path = VENV) -> tuple[Path, Path]:
    """(the tritonserver binary, its backends folder, with the Python backend's stub for this Python) in the venv."""
    root = site_packages(venv) / "pytriton" / "tritonserver"
    binary = root / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.exists() or not stub.exists():
        raise TritonError(f"{venv} has no tritonserver with a Python {version} backend stub (looked in {root})")
    # Where pytriton itself puts it: the stub finds its libraries by a path relative to its own folder.
    backends = root / "backends"
    if not (backends / "python" / stub.name).exists():
        shutil.copy2(stub, backends / "python" / stub.name)
    return binary, backends


def free_port(host: str) -> int:
    """A port free now; tritonserver takes no port 0, so one is picked for it (a start that loses it is retried)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Triton:
    """A running `tritonserver` in a process group of its own; `stop` ends the group (server and backend stubs)."""

    def __init__(self, repo: Path, *, venv: Path = VENV, host: str = "127.0.0.1", port: int = 0, log=None) -> None:
        self.repo, self.venv, self.host, self.port, self.log = repo, venv, host, port, log
        self.proc: subprocess.Popen | None = None

    def start(self, models: list[str], timeout_s: float = START_S, stopping: list | None = None) -> int:
        """Start the server and wait until every model in `models` is ready; the gRPC port. TritonError if not.
        `stopping`: waiting ends early once it holds something (a signal came)."""
        stopping = [] if stopping is None else stopping
        binary, backends = server_files(self.venv)
        for _ in range(3):  # a port picked for it may be taken before it binds
            port = self.port or free_port(self.host)
            cmd = [
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
            # A group of its own, so that stopping it stops its backend stubs too; and it dies with this process,
            # however this process dies (its stubs follow their server).
            self.proc = subprocess.Popen(
                cmd,
                stdout=self.log or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=dies_with_parent(signal.SIGKILL),
            )
            if self._wait_ready(port, models, timeout_s, stopping) or stopping:
                self.port = port
                return port
            hung = self.proc.poll() is None  # not a lost port, which ends it at once: trying again would not help
            code = self.stop()
            if self.port or hung:
                break
        why = f"not ready within {timeout_s:g} s" if hung else f"exited with status {code}"
        raise TritonError(f"tritonserver did not serve {', '.join(models)}: {why} (its log says why)")

    def _wait_ready(self, port: int, models: list[str], timeout_s: float, stopping: list) -> bool:
        deadline = time.monotonic() + timeout_s
        with transport.channel(f"{self.host}:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline and self.proc.poll() is None and not stopping:
                try:
                    if all(stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=2).ready for name in models):
                        return True
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        return False

    def stop(self) -> int | None:
        """SIGTERM to the whole group, SIGKILL past EXIT_TIMEOUT_S and a margin; the server's exit status."""
        if self.proc is None:
            return None
        for sig, wait_s in ((signal.SIGTERM, EXIT_TIMEOUT_S + 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.poll()

    def __enter__(self) -> Triton:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "action",
        choices=["venv", "repo", "serve"],
        help="venv: create Triton's venv; repo: write the model repository; serve: both, and run tritonserver",
    )
    parser.add_argument("repo", type=Path, nargs="?", help="the model repository (serve: default a temporary folder)")
    add_models_argument(parser)
    parser.add_argument("--venv", type=Path, default=VENV, help="Triton's own venv (created by serve if missing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=number(int, at_least=0), default=8001, help="gRPC; 0 picks a free port")
    return parser


def main(args: argparse.Namespace) -> int:
    say = lambda line: print(f"triton: {line}", file=sys.stderr, flush=True)  # noqa: E731
    if args.action == "venv":
        try:
            ensure_venv(args.venv, say)
        except TritonError as e:
            say(str(e))
            return 1
        print(f"triton: venv ready in {args.venv}")
        return 0
    if args.action == "repo":
        if args.repo is None:
            raise ValueError("give the folder to write the repository into: splitleak triton repo DIR")
        names = write_repo(args.repo, args.models, args.venv)
        print(f"triton repository in {args.repo}: {', '.join(names)}")
        return 0
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # from here on, a signal stops the server, whenever it comes
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    try:
        ensure_venv(args.venv, say)
        with tempfile.TemporaryDirectory(prefix="splitleak-triton-") as tmp:
            repo = args.repo or Path(tmp)
            names = write_repo(repo, args.models, args.venv)
            with Triton(repo, venv=args.venv, host=args.host, port=args.port, log=sys.stderr) as triton:
                port = triton.start(names, stopping=stopping)
                if stopping:
                    return 0
                print(f"triton listening on {args.host}:{port} serving {', '.join(names)}", flush=True)
                while not stopping and triton.proc.poll() is None:
                    time.sleep(0.2)
                if not stopping:
                    raise TritonError(f"tritonserver exited on its own (status {triton.proc.returncode})")
    except TritonError as e:
        say(str(e))
        return 1
    return 0
