"""The cloud (`splitleak cloud`): serves the tail of every exported split as an Open Inference Protocol model.

Each split S of an exported model NAME is the OIP model `NAME.S`: one input `activation` (the head's output, batch
first) and one output `logits`, run with ONNX Runtime. The activation may also arrive in a defended form (FP16,
quantised UINT8 levels with their `scale` and `zero_point`, or only some channels with their indices): the cloud
restores it to FP32 with splitleak.core.defences.restore, the same module the device's defences come from. Every request
is checked before it runs, and a bad one gets a status that says what was expected: unknown model NOT_FOUND; wrong
tensor name, datatype, shape, byte length or quantisation parameters INVALID_ARGUMENT; a batch or message over the
limits RESOURCE_EXHAUSTED. On a stream (Triton's ModelStreamInfer) an
error is answered in-band in `error_message` and the stream goes on. On SIGTERM the cloud stops taking new work,
finishes what is in flight, and exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import splitleak
from splitleak.core import codec, defences, manifest, transport
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc

MAX_BATCH = 256


class InferError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Tail:
    """The tail of one split, ready to run."""

    name: str
    session: ort.InferenceSession
    activation_shape: tuple[int, ...]
    activation_datatype: str
    num_classes: int

    @classmethod
    def load(cls, m: manifest.Manifest, split: manifest.Split, threads: int) -> Tail:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(split.tail), options, providers=["CPUExecutionProvider"])
        return cls(
            m.served_name(split.name), session, split.activation_shape, split.activation_datatype, len(m.classes)
        )

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
        """What can be checked before the tensors are read; `restore` checks the rest of the form."""
        names = [t.name for t in request.inputs]
        if "activation" not in names or len(set(names)) != len(names) or not set(names) <= set(defences.INPUTS):
            raise InferError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: got inputs {names}; expected {self.expected()}"
            )
        tensor = request.inputs[names.index("activation")]
        if tensor.datatype not in defences.DATATYPES:
            raise InferError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.name}: got datatype {tensor.datatype!r}; expected {self.expected()}",
            )
        if len(tensor.shape) < 2 or tensor.shape[0] < 1:
            raise InferError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.name}: got shape {list(tensor.shape)}; expected {self.expected()}",
            )
        if tensor.shape[0] > MAX_BATCH:
            raise InferError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.name}: batch of {tensor.shape[0]} is over the limit of {MAX_BATCH}",
            )
        unknown = [o.name for o in request.outputs if o.name != "logits"]
        if unknown:
            raise InferError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: no output named {unknown}; the only output is 'logits'"
            )

    def run(self, activation: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"activation": activation})[0]


# Called with every request the cloud accepts, before it runs: where a curious cloud keeps its copy.
RequestObserver = Callable[[pb.ModelInferRequest, int], None]


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, tails: dict[str, Tail], observers: list[RequestObserver] | None = None) -> None:
        self.tails = tails
        self.observers = observers or []
        self.draining = threading.Event()

    # Health and metadata.
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=not self.draining.is_set())

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(
            ready=self._tail(request.name, request.version) is not None and not self.draining.is_set()
        )

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="splitleak", version=splitleak.__version__, extensions=["model_repository", "streaming"]
        )

    def ModelMetadata(self, request, context):
        tail = self._tail(request.name, request.version)
        if tail is None:
            context.abort(grpc.StatusCode.NOT_FOUND, self._not_found(request.name, request.version))
        return tail.metadata()

    def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=name, version="1", state="READY")
                for name in sorted(self.tails)
            ]
        )

    # Inference.
    def ModelInfer(self, request, context):
        try:
            return self.infer(request)
        except InferError as e:
            context.abort(e.code, e.message)

    def ModelStreamInfer(self, request_iterator: Iterator[pb.ModelInferRequest], context):
        for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=self.infer(request))
            except InferError as e:
                yield pb.ModelStreamInferResponse(
                    error_message=f"{e.code.name}: {e.message}", infer_response=pb.ModelInferResponse(id=request.id)
                )
            if self.draining.is_set():
                return  # what was in flight is answered; the device sees the stream end

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        recv_ns = time.time_ns()
        start = time.perf_counter()
        tail = self._tail(request.model_name, request.model_version)
        if tail is None:
            raise InferError(grpc.StatusCode.NOT_FOUND, self._not_found(request.model_name, request.model_version))
        tail.validate(request)
        try:
            activation = defences.restore(
                codec.decode_request(request),
                codec.get_parameters(request.parameters),
                shape=tail.activation_shape,
            )
        except (codec.CodecError, defences.RestoreError) as e:
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT, f"{tail.name}: {e}; expected {tail.expected()}") from e
        for observe in self.observers:
            observe(request, recv_ns)
        logits = tail.run(activation)
        compute_ms = (time.perf_counter() - start) * 1e3
        return codec.encode_response(
            request,
            {"logits": logits},
            {"cloud_recv_ns": recv_ns, "cloud_compute_ms": compute_ms, "cloud_send_ns": time.time_ns()},
        )

    def _tail(self, name: str, version: str) -> Tail | None:
        return self.tails.get(name) if version in ("", "1") else None

    def _not_found(self, name: str, version: str) -> str:
        what = f"model {name!r}" + (f" version {version!r}" if version else "")
        return f"{what} is not served here (only version 1 exists); models: {', '.join(sorted(self.tails))}"


def load_tails(model_dirs: list[Path], threads: int = 1) -> dict[str, Tail]:
    tails = {}
    for model_dir in model_dirs:
        m = manifest.load(model_dir)
        for split in m.splits.values():
            tail = Tail.load(m, split, threads)
            tails[tail.name] = tail
    return tails


def serve(
    service: InferenceService, *, host: str = "127.0.0.1", port: int = 0, max_workers: int = 16
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Start serving; returns the server, the port it listens on, and its health servicer."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=transport.OPTIONS)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    for name in ("", transport.SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def drain(
    server: grpc.Server, service: InferenceService, health_servicer: health.HealthServicer, grace_s: float = 10.0
) -> None:
    """Stop taking work, let what is in flight finish (up to `grace_s`), then stop."""
    service.draining.set()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace_s).wait()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        type=Path,
        nargs="+",
        default=[manifest.DEFAULT_MODEL_DIR],
        help="exported model folders (default: the shipped ResNet-20 on CIFAR-10)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port and prints it")
    parser.add_argument("--workers", type=int, default=16, help="concurrent RPCs (each open stream holds one)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per inference")
    parser.add_argument(
        "--record",
        type=Path,
        metavar="DIR",
        help="curious cloud: also write every accepted request to a capture in DIR",
    )
    parser.add_argument("--dataset", help="with --record: the data set the device's frames come from, if known")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        service = InferenceService(load_tails(args.models, args.threads))
    except (FileNotFoundError, ValueError) as e:
        print(f"cloud: {e}", file=sys.stderr)
        return 2
    server, port, health_servicer = serve(service, host=args.host, port=args.port, max_workers=args.workers)
    sink = None
    if args.record:
        # Imported only here: an honest cloud needs nothing of the attacker's.
        from splitleak.core.capture import CaptureSink, CaptureWriter

        # Added once the port is known (the capture names it) and before it is announced, so no device is missed.
        sink = CaptureSink(CaptureWriter(args.record, tap="cloud", dataset=args.dataset, cloud=f"{args.host}:{port}"))
        service.observers.append(lambda request, recv_ns: sink.put(request.SerializeToString(), recv_ns))
    print(f"cloud listening on {args.host}:{port} serving {', '.join(sorted(service.tails))}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("cloud draining: finishing in-flight requests", file=sys.stderr, flush=True)
    drain(server, service, health_servicer)
    if sink is not None:
        sink.close()
        print("cloud recorded: " + ", ".join(f"{k} {v}" for k, v in sink.stats.items()), file=sys.stderr, flush=True)
    return 0
