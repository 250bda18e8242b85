"""The tail of each exported split, and what a request must hold for it to run: `Tail.validate` checks what can be
checked before the tensors are read (the codec and splitleak.core.defences.restore check the rest), and every
refusal is an InferError with the status and the message the client gets, its own strings cut short."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from splitleak.core import codec, defences, manifest, serving
from splitleak.core.serving import quote, quote_all
from splitleak.protos import inference_pb2 as pb

MAX_BATCH = 256
# A tail that runs a frame in less than this is run on the event loop that received the request (cloud/server.py):
# handing it to a thread and back costs more (two thread wake-ups, about 0.1 ms on a busy machine), and health
# checks wait no longer than a few such runs.
INLINE_MS = 0.05


def add_models_argument(parser: argparse.ArgumentParser) -> None:
    """`--models`: the exported model folders whose tails a server serves."""
    parser.add_argument(
        "--models",
        type=Path,
        nargs="+",
        default=[manifest.DEFAULT_MODEL_DIR],
        help="exported model folders (default: the shipped ResNet-20 on CIFAR-10)",
    )


class InferError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = serving.clip(message)
        self.request_id = request_id


@dataclass
class Tail:
    """The tail of one split, ready to run."""

    name: str
    session: ort.InferenceSession
    activation_shape: tuple[int, ...]
    activation_datatype: str
    num_classes: int
    inline: bool = False  # whether a frame runs in under INLINE_MS (measured at load)

    @classmethod
    def load(cls, m: manifest.Manifest, split: manifest.Split, threads: int) -> Tail:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(split.tail), options, providers=["CPUExecutionProvider"])
        tail = cls(
            m.served_name(split.name), session, split.activation_shape, split.activation_datatype, len(m.classes)
        )
        tail.inline = tail.frame_ms() < INLINE_MS
        return tail

    def frame_ms(self, runs: int = 20) -> float:
        """One frame's run, at its fastest of `runs` (the first ones warm the session up)."""
        activation = np.zeros((1, *self.activation_shape), np.float32)
        fastest = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            self.run(activation)
            fastest = min(fastest, time.perf_counter() - start)
        return fastest * 1e3

    def metadata(self) -> pb.ModelMetadataResponse:
        return pb.ModelMetadataResponse(
            name=self.name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name="activation", datatype=self.activation_datatype, shape=[-1, *self.activation_shape]
                )
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(name="logits", datatype="FP32", shape=[-1, self.num_classes])
            ],
        )

    def expected(self) -> str:
        return (
            f"one input 'activation' of datatype {self.activation_datatype} and shape [-1, "
            f"{', '.join(map(str, self.activation_shape))}] in raw_input_contents, or a defended form: "
            f"{defences.forms(self.activation_shape)}"
        )

    def validate(self, request: pb.ModelInferRequest) -> None:
        """What can be checked before the tensors are read; the codec and `restore` check the rest of the form."""
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        names = [t.name for t in request.inputs]
        if "activation" not in names or len(set(names)) != len(names) or not set(names) <= set(defences.INPUTS):
            raise InferError(invalid, f"{self.name}: got inputs {quote_all(names)}; expected {self.expected()}")
        for tensor in request.inputs:  # the names are known ones from here on
            if tensor.datatype not in codec.DATATYPES:
                raise InferError(
                    invalid, f"{self.name}: input '{tensor.name}' has unknown datatype {quote(tensor.datatype)}"
                )
        tensor = request.inputs[names.index("activation")]
        if tensor.datatype not in defences.DATATYPES:
            raise InferError(invalid, f"{self.name}: got datatype {quote(tensor.datatype)}; expected {self.expected()}")
        shape = tensor.shape
        if len(shape) < 2 or shape[0] < 1 or any(d < 0 for d in shape):
            raise InferError(invalid, f"{self.name}: got shape {quote_all(shape, 8)}; expected {self.expected()}")
        if shape[0] > MAX_BATCH:
            raise InferError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.name}: batch of {shape[0]} is over the limit of {MAX_BATCH}"
            )
        unknown = [o.name for o in request.outputs if o.name != "logits"]
        if unknown:
            raise InferError(invalid, f"{self.name}: no output named {quote_all(unknown)}; the only output is 'logits'")

    def plain_activation(self, request: pb.ModelInferRequest) -> np.ndarray | None:
        """The activation of a request in the form an undefended device sends (one FP32 input `activation` of the
        tail's shape in raw_input_contents, a batch of 1 to MAX_BATCH, no output asked for but `logits`), read with
        a few comparisons; None for any other form, which `validate`, the codec and `restore` check in full."""
        inputs, contents, outputs = request.inputs, request.raw_input_contents, request.outputs
        if len(inputs) != 1 or len(contents) != 1 or self.activation_datatype != "FP32":
            return None
        tensor = inputs[0]
        shape = tuple(tensor.shape)
        if tensor.name != "activation" or tensor.datatype != "FP32" or shape[1:] != self.activation_shape:
            return None
        if not 1 <= shape[0] <= MAX_BATCH or (outputs and any(o.name != "logits" for o in outputs)):
            return None
        raw = contents[0]
        if len(raw) != shape[0] * 4 * math.prod(self.activation_shape):
            return None
        return np.frombuffer(raw, "<f4").reshape(shape)

    def run(self, activation: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"activation": activation})[0]


def load_tails(model_dirs: list[Path], threads: int = 1) -> dict[str, Tail]:
    tails = {}
    for model_dir in model_dirs:
        m = manifest.load(model_dir)
        for split in m.splits.values():
            tail = Tail.load(m, split, threads)
            tails[tail.name] = tail
    return tails
