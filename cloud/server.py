"""The cloud (`splitleak cloud`): serves the tail of every exported split as an Open Inference Protocol model.

Each split S of an exported model NAME is the OIP model `NAME.S`: one input `activation` (the head's output, batch
first) and one output `logits`, run with ONNX Runtime. The activation may also arrive in a defended form (FP16,
quantised UINT8 levels with their `scale` and `zero_point`, or only some channels with their indices): the cloud
restores it to FP32 with splitleak.core.defences.restore, the same module the device's defences come from.

Every request is checked before it runs, and a bad one gets a status that says what was expected, with the client's
strings cut short (splitleak.core.serving.quote): a message that is not a request, a wrong tensor name, datatype,
shape, byte length or quantisation parameter, an over-long id, or NaN or infinite values INVALID_ARGUMENT; an
unknown model NOT_FOUND; a batch or message over the limits RESOURCE_EXHAUSTED. On a stream (Triton's
ModelStreamInfer) an error is answered in-band in `error_message` and the stream goes on to the next request. Each
error answered is one line on stderr. docs/cloud.md has the table, the limits and the measured load.

The server is grpc.aio: streams wait as coroutines, bounded per connection and in all (splitleak.core.serving), and
read and write their messages directly, under one idle timer each (serving.Watch). A small request to a tail that
runs a frame in microseconds (Tail.inline: `layer3` of ResNet-20) is answered on the event loop, where a hop to a
thread and back would cost more than the work; every other request's work (parsing, checks, the tail) runs on a
thread pool of one thread per core, since ONNX Runtime releases the GIL while it runs. With `--batch-max`, the frames
of requests from every stream are gathered into one run of their tail (cloud/batcher.py). On SIGTERM the cloud stops
taking requests, answers those it has received, ends the streams still open (UNAVAILABLE), and exits within the grace
period.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import splitleak
from splitleak.cloud import wire
from splitleak.cloud.batcher import Batcher, Batching
from splitleak.cloud.tail import InferError, Tail, add_models_argument, load_tails
from splitleak.core import codec, defences, serving, transport
from splitleak.core.options import host_port
from splitleak.core.serving import quote
from splitleak.core.tls import Tls
from splitleak.protos import inference_pb2 as pb

MAX_ID_CHARS = 256  # every answer echoes the request's id; a longer one is refused, so that answers stay small
# Health and metadata requests hold a name or two, and are parsed on the event loop: a larger one is refused unread,
# so that none keeps the loop from answering the rest.
MAX_PLAIN_BYTES = 64 * 1024
# An inference request to a tail cheap enough to run on the event loop (Tail.inline) is answered there if it is no
# larger than this: parsing it takes microseconds, and even 1-bit quantised frames at that size are a batch whose run
# keeps the loop under a millisecond.
INLINE_BYTES = 64 * 1024
BATCH_DELAY_MS = 0.0  # with --batch-max: a batch takes what has come by the event loop's next turn, as Triton's default

log = logging.getLogger("splitleak.cloud")

# Called with every request the cloud accepts, as it arrived (serialized), and the wall clock (ns) when it did, before
# it runs: where a curious cloud keeps its copy.
RequestObserver = Callable[[bytes, int], None]


@dataclass(frozen=True)
class Job:
    """A request parsed and checked, waiting for its tail's logits."""

    request: pb.ModelInferRequest
    tail: Tail
    activation: np.ndarray  # (B, *tail.activation_shape) float32
    recv_ns: int  # wall clock when it arrived
    start: float  # perf_counter then


class InferenceService:
    """The OIP methods. `answer` (bytes in, a response or InferError out) is all the checking and running, plain and
    synchronous; the rest is how grpc.aio calls it."""

    def __init__(
        self,
        tails: dict[str, Tail],
        *,
        limits: serving.Limits | None = None,
        workers: int | None = None,
        observers: list[RequestObserver] | None = None,
        batching: Batching | None = None,
    ) -> None:
        self.tails = tails
        self.observers = observers or []
        self.gate = serving.Gate(limits or serving.Limits(), log, "cloud")
        self.executor = ThreadPoolExecutor(workers or os.cpu_count() or 1, thread_name_prefix="cloud-tail")
        # One batcher per tail, made on the event loop's first request (they hold its futures).
        self.batching = batching
        self._batchers: dict[str, Batcher] | None = None

    @property
    def batchers(self) -> dict[str, Batcher] | None:
        if self.batching is None:
            return None
        if self._batchers is None:
            self._batchers = {name: Batcher(tail, self.batching, self.executor) for name, tail in self.tails.items()}
        return self._batchers

    def answer(self, raw: bytes, checked: bool = False) -> pb.ModelInferResponse:
        """Parse, check and run one serialized ModelInferRequest (`checked`: wire.check_request has passed it)."""
        job = self.prepare(raw, checked)
        with self._faults(job.request):
            return self.finish(job, job.tail.run(job.activation))

    def prepare(self, raw: bytes, checked: bool = False) -> Job:
        """Parse and check a serialized ModelInferRequest, up to the activation its tail is to run."""
        recv_ns = time.time_ns()
        start = time.perf_counter()
        try:
            if not checked:
                wire.check_request(raw)
            request = pb.ModelInferRequest.FromString(raw)
        except (wire.WireError, DecodeError) as e:
            raise InferError(
                grpc.StatusCode.INVALID_ARGUMENT, f"not a ModelInferRequest ({len(raw)} bytes): {e}"
            ) from e
        request_id = request.id  # read once: each read of a string field makes a new copy, and this one may be large
        if len(raw) > transport.MAX_MESSAGE_BYTES:
            raise InferError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"message of {len(raw)} bytes is over the limit of {transport.MAX_MESSAGE_BYTES}",
                request_id[:MAX_ID_CHARS],
            )
        if len(request_id) > MAX_ID_CHARS:
            raise InferError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request id of {len(request_id)} characters; at most {MAX_ID_CHARS}, as every answer echoes it",
                request_id[:MAX_ID_CHARS],
            )
        with self._faults(request, request_id):
            name, version = request.model_name, request.model_version
            tail = self._tail(name, version)
            if tail is None:
                raise InferError(grpc.StatusCode.NOT_FOUND, self._not_found(name, version))
            activation = tail.plain_activation(request)
            if activation is None:  # a defended form, or a request that is wrong
                activation = self._restore(tail, request)
            non_finite = activation.size - np.count_nonzero(np.isfinite(activation))
            if non_finite:
                raise InferError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{tail.name}: the activation holds {non_finite} NaN or infinite values; logits computed from "
                    "them would be NaN or infinite too, meaningless as a prediction",
                )
            for observe in self.observers:
                observe(raw, recv_ns)
        return Job(request, tail, activation, recv_ns, start)

    def finish(self, job: Job, logits: np.ndarray) -> pb.ModelInferResponse:
        """The answer to a prepared request, given the logits its tail gave."""
        if not np.isfinite(logits).all():
            raise InferError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{job.tail.name}: the activation's values (largest magnitude {np.abs(job.activation).max():.3g}) "
                "overflow the tail: its logits are not finite, meaningless as a prediction",
            )
        compute_ms = (time.perf_counter() - job.start) * 1e3
        return codec.encode_response(
            job.request,
            {"logits": logits},
            {"cloud_recv_ns": job.recv_ns, "cloud_compute_ms": compute_ms, "cloud_send_ns": time.time_ns()},
        )

    @contextlib.contextmanager
    def _faults(self, request: pb.ModelInferRequest, request_id: str | None = None):
        """What goes wrong from here on answers with the request's id; a fault of the cloud's is INTERNAL."""
        try:
            yield
        except InferError as e:
            e.request_id = request.id if request_id is None else request_id
            raise
        except Exception as e:  # noqa: BLE001 - a fault of the cloud's, not the client's: logged whole, said plainly
            log.exception("failed on a request to %s", quote(request.model_name))
            raise InferError(
                grpc.StatusCode.INTERNAL,
                f"the cloud failed on this request ({type(e).__name__})",
                request.id if request_id is None else request_id,
            ) from e

    def _restore(self, tail: Tail, request: pb.ModelInferRequest) -> np.ndarray:
        tail.validate(request)
        try:
            with np.errstate(over="ignore"):  # a scale that overflows float32 gives infinities, refused just below
                return defences.restore(
                    codec.decode_request(request),
                    codec.get_parameters(request.parameters),
                    shape=tail.activation_shape,
                )
        except (codec.CodecError, defences.RestoreError) as e:
            raise InferError(grpc.StatusCode.INVALID_ARGUMENT, f"{tail.name}: {e}; expected {tail.expected()}") from e

    def _tail(self, name: str, version: str) -> Tail | None:
        return self.tails.get(name) if version in ("", "1") else None

    def _not_found(self, name: str, version: str) -> str:
        what = f"model {quote(name)}" + (f" version {quote(version)}" if version else "")
        return f"{what} is not served here (only version 1 exists); models: {', '.join(sorted(self.tails))}"

    # Inference over gRPC: requests come as bytes, so that a message that is not a request is answered
    # INVALID_ARGUMENT like any other bad one. A small one to a cheap tail is answered on the event loop, the rest
    # on the pool, so that a large one never stalls the loop.

    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with self.gate.call(context, "ModelInfer") as admitted:
            if admitted:
                response, error = await self._answered(raw, in_band=False)
                if error is None:
                    return response
                self.gate.fail(context, "ModelInfer", error.code, error.message)
        return b""  # the status says why

    async def model_stream_infer(self, requests, context: grpc.aio.ServicerContext) -> None:
        async with self.gate.call(context, "ModelStreamInfer") as admitted:
            if not admitted:
                return
            async with serving.Watch(self.gate, context, self.gate.limits.idle_timeout_s) as stream:
                while (raw := await stream.read()) is not None:
                    answer, error = await self._answered(raw, in_band=True)
                    if error is not None:
                        self.gate.error(context.peer(), "ModelStreamInfer", error.code, error.message)
                    await stream.write(answer)

    async def _answered(self, raw: bytes, *, in_band: bool) -> tuple[bytes | None, InferError | None]:
        """The serialized answer (a ModelStreamInferResponse if `in_band`, with the error in it, else a
        ModelInferResponse or None) and the error it reports."""
        try:
            response = await self._response(raw)
        except InferError as e:
            e = e.with_traceback(None)  # its frames hold the request: let them go now
            if not in_band:
                return None, e
            answer = pb.ModelStreamInferResponse(
                error_message=f"{e.code.name}: {e.message}", infer_response=pb.ModelInferResponse(id=e.request_id)
            )
            return answer.SerializeToString(), e
        if in_band:
            return pb.ModelStreamInferResponse(infer_response=response).SerializeToString(), None
        return response.SerializeToString(), None

    async def _response(self, raw: bytes) -> pb.ModelInferResponse:
        """On the event loop if the request is small and its tail cheap, else on the pool; through the tail's
        batcher if the cloud batches."""
        inline, checked = self._inline(raw)
        if self.batchers is None:
            if inline:
                return self.answer(raw, checked)
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.answer, raw, checked)
        # Batched, a small request is parsed and checked on the loop whatever its tail: only the batch's run, where
        # the time goes, is worth a thread (8 devices at `layer1`: 0.82 of the unbatched cloud's frames/s with
        # parsing on the pool too, 0.96 without; bench/devices_vs_triton.py).
        if len(raw) <= INLINE_BYTES:
            job = self.prepare(raw, checked)
        else:
            job = await asyncio.get_running_loop().run_in_executor(self.executor, self.prepare, raw, checked)
        with self._faults(job.request):
            return self.finish(job, await self.batchers[job.tail.name].run(job.activation))

    def _inline(self, raw: bytes) -> tuple[bool, bool]:
        """Whether to answer `raw` on the event loop, and whether wire.check_request has passed it."""
        if len(raw) > INLINE_BYTES:
            return False, False
        try:
            name = wire.check_request(raw)
        except wire.WireError:
            return True, False  # refused in microseconds, saying why
        tail = self.tails.get(name.decode(errors="replace"))
        return tail is None or tail.inline, True

    # Health and metadata: answered on the event loop, whatever the streams are doing.

    def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.gate.stopping.is_set())

    def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        ready = self._tail(request.name, request.version) is not None and not self.gate.stopping.is_set()
        return pb.ModelReadyResponse(ready=ready)

    def server_metadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="splitleak", version=splitleak.__version__, extensions=["model_repository", "streaming"]
        )

    def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        tail = self._tail(request.name, request.version)
        if tail is None:
            raise InferError(grpc.StatusCode.NOT_FOUND, self._not_found(request.name, request.version))
        return tail.metadata()

    def repository_index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=name, version="1", state="READY")
                for name in sorted(self.tails)
            ]
        )

    def handler(self) -> grpc.GenericRpcHandler:
        """Every OIP method, each taking bytes, so that no request fails in gRPC's own parsing (as UNKNOWN)."""
        methods = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self.repository_index),
        }
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._plain(name, *m)) for name, m in methods.items()}
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(self.model_infer)
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
        return grpc.method_handlers_generic_handler(transport.SERVICE_NAME, handlers)

    def _plain(self, method: str, request_type, respond):
        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                if len(raw) > MAX_PLAIN_BYTES:
                    raise InferError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"a {request_type.__name__} of {len(raw)} bytes; at most {MAX_PLAIN_BYTES}, for a name or two",
                    )
                return respond(request_type.FromString(raw)).SerializeToString()
            except DecodeError as e:
                message = f"not a {request_type.__name__} ({len(raw)} bytes): {e}"
                self.gate.fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, message)
            except InferError as e:
                self.gate.fail(context, method, e.code, e.message)
            return b""  # the status says why

        return handle


async def serve(
    service: InferenceService, *, host: str = "127.0.0.1", port: int = 0, tls: Tls | None = None
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start serving, with mutual TLS if given; returns the server, the port it listens on, and its health servicer.
    OSError if it cannot."""
    server = grpc.aio.server(options=transport.SERVER_OPTIONS)
    server.add_generic_rpc_handlers((service.handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = serving.listen(server, host, port, tls)
    await server.start()
    for name in ("", transport.SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


async def drain(server: grpc.aio.Server, service: InferenceService, health_servicer: health.aio.HealthServicer) -> None:
    """Stop taking work, answer what has been received, end open streams, and stop within the grace period."""
    service.gate.stop()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(service.gate.limits.grace_s)
    # A tail still running past the grace period finishes on its thread; nothing waits for its answer.
    service.executor.shutdown(wait=False, cancel_futures=True)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_models_argument(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=serving.port_number, default=8001, help="0 picks a free port and prints it")
    parser.add_argument(
        "--workers",
        type=serving.positive_int,
        default=os.cpu_count() or 1,
        help="threads that parse, check and run requests (default: one per core)",
    )
    parser.add_argument("--threads", type=serving.positive_int, default=1, help="ONNX Runtime threads per inference")
    parser.add_argument(
        "--batch-max",
        type=serving.positive_int,
        default=1,
        metavar="N",
        help="dynamic batching: gather the frames of requests from every stream into one run of their tail, up to N "
        "frames (default 1: each request runs alone)",
    )
    parser.add_argument(
        "--batch-delay-ms",
        type=serving.non_negative_float,
        default=BATCH_DELAY_MS,
        metavar="D",
        help=f"with --batch-max: run a batch at most D ms after its first request came (default {BATCH_DELAY_MS:g})",
    )
    serving.Limits.add_arguments(parser)
    parser.add_argument(
        "--record",
        type=Path,
        metavar="DIR",
        help="curious cloud: also write every accepted request to a capture in DIR",
    )
    parser.add_argument(
        "--feed",
        metavar="HOST:PORT",
        help="also send every request, as it comes, to a consumer there (the curious cloud)",
    )
    parser.add_argument("--dataset", help="with --record: the data set the device's frames come from, if known")
    Tls.add_arguments(parser, "cloud")
    return parser


def main(args: argparse.Namespace) -> int:
    args.tls = Tls.from_args(args, "cloud")
    try:
        tails = load_tails(args.models, args.threads)
    except (FileNotFoundError, ValueError) as e:
        print(f"cloud: {e}", file=sys.stderr)
        return 2
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(logging.Formatter("cloud: %(message)s"))
    log.addHandler(errors)
    log.propagate = False
    return asyncio.run(_serve_until_signal(args, tails))


async def _serve_until_signal(args: argparse.Namespace, tails: dict[str, Tail]) -> int:
    batching = Batching(args.batch_max, args.batch_delay_ms / 1e3) if args.batch_max > 1 else None
    service = InferenceService(tails, limits=serving.Limits.from_args(args), workers=args.workers, batching=batching)
    try:
        server, port, health_servicer = await serve(service, host=args.host, port=args.port, tls=args.tls)
    except OSError as e:
        print(f"cloud: {e}", file=sys.stderr)
        return 2
    where = host_port(args.host, port)
    sink = feed = None
    if args.record or args.feed:
        # Imported only here: an honest cloud records nothing.
        from splitleak.core.capture import CaptureSink, CaptureWriter
        from splitleak.core.feed import FeedSender

        # Added once the port is known (the capture names it) and before it is announced, so no device is missed.
        try:
            feed = args.feed and FeedSender(args.feed)
            writer = args.record and CaptureWriter(args.record, tap="cloud", dataset=args.dataset, cloud=where)
        except OSError as e:  # FileExistsError among them
            print(f"cloud: {e}", file=sys.stderr)
            await server.stop(None)
            return 2
        sink = CaptureSink(writer or None, on_capture=[feed] if feed else None)
        service.observers.append(sink.put)
    wire = ", mutual TLS" if args.tls else ""
    print(
        f"cloud listening on {where}{wire} serving {', '.join(sorted(service.tails))}",
        flush=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    print("cloud draining: answering what it has received", file=sys.stderr, flush=True)
    await drain(server, service, health_servicer)
    if sink is not None:
        sink.close()
        stats = sink.stats | (feed.stats if feed else {})
        if feed:
            feed.close()
        print("cloud recorded: " + ", ".join(f"{k} {v}" for k, v in stats.items()), file=sys.stderr, flush=True)
    return 0
