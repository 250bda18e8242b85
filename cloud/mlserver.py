"""The tail on Seldon's MLServer (`splitleak mlserver`): a model repository with a custom runtime, MLServer's venv,
the server.

`splitleak mlserver repo DIR` writes one model per split of each exported model, named as splitleak's cloud names it
(`NAME.S`): `model-settings.json` (the input and output it declares, and the runtime), `model.onnx` (the tail) and
`runtime.py`, a custom MLServer runtime running the tail with ONNX Runtime. `splitleak mlserver venv` creates
MLServer's own venv (`make test` does, as `.venv-mlserver`): MLServer 1.7.1 installs only beside protobuf < 7, which
splitleak's stubs cannot use. `splitleak mlserver serve [DIR]` runs `mlserver start` on loopback in a process group
of its own (splitleak.cloud.engine), its gRPC, REST and metrics ports all on `--host`.

MLServer's streaming call takes Triton's requests but answers with bare ModelInferResponses, and ends on an error
instead of answering it in-band; the runtime answers every request of the call (`predict_stream`), so the device
streams to it with `--stream oip` (which `--stream auto` picks from ServerMetadata). Like Triton it returns none of
splitleak's timing parameters and takes only the FP32 activation its settings declare.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from splitleak.cloud import engine
from splitleak.core import manifest

RUNTIME_PY = '''"""splitleak's tail on MLServer: ONNX Runtime on the model's `uri`. From `splitleak mlserver repo`."""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


def _name(datatype) -> str:
    return getattr(datatype, "value", datatype)


class Tail(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        path = await get_model_uri(self._settings)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # Checked here, so that a wrong tensor is INVALID_ARGUMENT (MLServerError's 400) and not ONNX Runtime's
        # failure, which MLServer answers INTERNAL, a status a client takes for the server's fault.
        declared = self._settings.inputs[0]
        expected = (declared.name, _name(declared.datatype), list(declared.shape[1:]))
        got = [(t.name, _name(t.datatype), list(t.shape)) for t in payload.inputs]
        if len(got) != 1 or (got[0][0], got[0][1], got[0][2][1:]) != expected:
            raise MLServerError(
                f"{self.name}: got inputs {got}; expected one {_name(declared.datatype)} '{declared.name}' of shape "
                f"{list(declared.shape)}"
            )
        activation = NumpyCodec.decode_input(payload.inputs[0])
        logits = self.session.run(["logits"], {"activation": activation})[0]
        return InferenceResponse(
            model_name=self.name, id=payload.id, outputs=[NumpyCodec.encode_output("logits", logits)]
        )

    async def predict_stream(self, payloads):
        # MLServer hands the runtime every request of a ModelStreamInfer call; its default answers the first alone
        # and ends the call (a stream built for one generation). A device streams frames: each gets its answer.
        async for payload in payloads:
            yield await self.predict(payload)
'''


class MLServer(engine.Server):
    """A running `mlserver start`, on loopback, in a process group of its own."""

    name = "mlserver"
    venv = Path(".venv-mlserver")
    requirements = ("mlserver==1.7.1", "numpy<2", "onnxruntime>=1.20")
    exit_timeout_s = 10

    @classmethod
    def write_model(cls, folder: Path, name: str, m: manifest.Manifest, split: manifest.Split, venv: Path) -> None:
        shutil.copyfile(split.tail, folder / "model.onnx")
        (folder / "runtime.py").write_text(RUNTIME_PY)
        settings = {
            "name": name,
            "implementation": "runtime.Tail",
            "parameters": {"uri": "./model.onnx"},
            "inputs": [{"name": "activation", "datatype": "FP32", "shape": [-1, *split.activation_shape]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(m.classes)]}],
        }
        (folder / "model-settings.json").write_text(json.dumps(settings, indent=1))

    def command(self, port: int) -> list[str]:
        # MLServer takes its ports from settings.json in the repository; REST and metrics are not used here.
        settings = {
            "host": self.host,
            "grpc_port": port,
            "http_port": engine.free_port(self.host),
            "metrics_port": engine.free_port(self.host),
            "parallel_workers": 0,  # one process: the tails are small, and workers would each load all of them
        }
        (self.repo / "settings.json").write_text(json.dumps(settings, indent=1))
        return [str(self.venv_path / "bin" / "mlserver"), "start", str(self.repo)]


def get_args_parser() -> argparse.ArgumentParser:
    return engine.get_args_parser(MLServer, __doc__.splitlines()[0])


def main(args: argparse.Namespace) -> int:
    return engine.main(MLServer, args)
