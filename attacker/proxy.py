"""The man in the middle (`splitleak attacker proxy`): relays device <-> cloud byte for byte, capturing each request.

It listens where the device expects the cloud, forwards every RPC to the real cloud, and keeps a copy of every
inference request in a capture (splitleak.core.capture), or sends it as it happens to a live consumer
(splitleak.core.feed), or both.

Each side gets what the other sent: messages are never parsed on the way through (the handlers take and return
bytes); replies, status codes, details and metadata come back as the cloud sent them; the device's metadata (less
gRPC's own headers, such as user-agent), deadline and cancellation are passed on to the cloud. Each device
connection gets a connection of its own to the cloud, so the cloud sees, and bounds, each device as it would
without the proxy.
The copies of ModelInfer and ModelStreamInfer requests, and of the cloud's answers to them (the logits a membership
test reads), go to a bounded queue (CaptureSink) that another thread drains, so a slow disk drops copies (counted)
instead of delaying the device.
Methods the proxy does not know are forwarded as bidirectional streams, which carry any cardinality on the wire.
The proxy answers gRPC health checks itself, like the cloud.

Like the cloud, it is a grpc.aio server with the bounds of splitleak.core.serving, so idle streams cannot starve it:
open inference calls per connection and in all, and an idle timeout (no message either way for that long). On
SIGTERM it stops taking requests, relays the cloud's answers to those it has forwarded, and ends within the grace
period.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitleak.attacker.relay import run_until as relay_ciphertext
from splitleak.core import process, serving, transport
from splitleak.core.capture import STREAM, UNARY, CaptureSink, CaptureWriter
from splitleak.core.feed import FeedSender
from splitleak.core.tls import Tls, speaks_tls
from splitleak.protos import inference_pb2 as pb

_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# (client streams, server streams) of every method the proxy knows; anything else is forwarded as a stream both ways.
_CARDINALITY = {f"/{_SERVICE.full_name}/{m.name}": (m.client_streaming, m.server_streaming) for m in _SERVICE.methods}
CAPTURED_METHODS = frozenset(f"/{_SERVICE.full_name}/{name}" for name in ("ModelInfer", "ModelStreamInfer"))
# Set by each gRPC stack itself; passing the device's on would be refused or duplicated.
_HOP_BY_HOP = ("user-agent", "grpc-", ":")
# A call without a deadline reports one some 292 years away.
_NO_DEADLINE_S = 1e9
# The cloud reads messages a little over the limit to answer them in-band; so the proxy must pass them on.
_UPSTREAM_OPTIONS = [
    *(option for option in transport.OPTIONS if option[0] != "grpc.max_send_message_length"),
    ("grpc.max_send_message_length", transport.MAX_RECEIVE_BYTES),
    # A connection of this channel's own, not one shared with every channel to the same cloud.
    ("grpc.use_local_subchannel_pool", 1),
]
# How long a device's connection to the cloud is kept after its last call: a device's calls come moments apart
# (its check, then its stream), and a unary call should not pay for a new connection each time.
LINGER_S = 10.0
# How many streams the proxy opens to the cloud for one of the device's when the cloud ends them before taking its first
# request and does not refuse it again when asked as a single request (see _Relay.run and _refused_again).
ASKS = 3

log = logging.getLogger("splitleak.proxy")


class Proxy:
    """A transparent gRPC proxy to `cloud` that hands a copy of every inference request to `sink`.

    It serves on an event loop of its own, on a thread, so that it can be started and stopped from plain code."""

    def __init__(
        self,
        cloud: str,
        sink: CaptureSink,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: serving.Limits | None = None,
        tls: Tls | None = None,
    ) -> None:
        self.cloud = cloud
        self.tls = tls
        self.sink = sink
        self.host = host
        self.port = port  # the one it listens on, once started
        # Its refusals name the cloud: the device is not to tell the proxy from the cloud it stands in for.
        self.gate = serving.Gate(limits or serving.Limits(), log, "cloud")
        self._forwarder = _Forwarder(cloud, sink, self.gate, tls)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)

    def start(self) -> int:
        """Start listening; returns the port. OSError, in one line, if it cannot."""
        self._thread.start()
        try:
            self.port = self._call(self._start())
        except OSError:
            self._end_loop()
            raise
        return self.port

    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking calls and relay the answers to those in flight (up to the grace period). The sink is its
        owner's to close."""
        self._call(self._stop(self.gate.limits.grace_s if grace_s is None else grace_s))
        self._end_loop()

    @property
    def stats(self) -> dict[str, int]:
        return {"forwarded": self._forwarder.forwarded, **self.sink.stats}

    async def _start(self) -> int:
        self._server = grpc.aio.server(options=transport.SERVER_OPTIONS)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        # Registered services (health) are looked up first; every other method falls through to the forwarder.
        self._server.add_generic_rpc_handlers((self._forwarder,))
        port = serving.listen(self._server, self.host, self.port, self.tls)
        await self._server.start()
        for name in ("", transport.SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    async def _stop(self, grace_s: float) -> None:
        self.gate.stop()
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        await self._forwarder.close()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, cloud: str, sink: CaptureSink, gate: serving.Gate, tls: Tls | None) -> None:
        self.cloud = cloud
        self.tls = tls
        self.sink = sink
        self.gate = gate
        self.forwarded = 0  # request messages passed on to the cloud
        self._channels: dict[str, _Upstream] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if _CARDINALITY.get(method) == (False, False):
            return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, method))
        return grpc.stream_stream_rpc_method_handler(functools.partial(self._stream, method))

    async def _unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with self.gate.call(context, method, counted=method in CAPTURED_METHODS) as admitted:
            if admitted:
                self._passed(method, request)
                async with self._upstream(context.peer()) as channel:
                    call = channel.unary_unary(method)(request, timeout=_timeout(context), metadata=_metadata(context))
                    try:
                        response = await call
                    except grpc.RpcError as e:
                        _relay_error(context, e)
                        return b""
                    headers = await call.initial_metadata()
                    if headers:  # none, as from splitleak's cloud: gRPC sends its own with the response, one write
                        await context.send_initial_metadata(headers)
                    context.set_trailing_metadata(tuple(await call.trailing_metadata()))
                    self._answered(UNARY, method, response)
                    return response
        return b""  # the status says why

    async def _stream(self, method: str, requests, context: grpc.aio.ServicerContext) -> None:
        counted = method in CAPTURED_METHODS or method not in _CARDINALITY
        async with self.gate.call(context, method, counted=counted) as admitted:
            if admitted:
                passed = functools.partial(self._passed, method)
                answered = functools.partial(self._answered, STREAM, method)
                async with self._upstream(context.peer()) as channel:
                    unsent = None
                    for ask in range(1, ASKS + 1):
                        call = channel.stream_stream(method)(timeout=_timeout(context), metadata=_metadata(context))
                        relay = _Relay(context, call, self.gate, passed, answered, unsent)
                        if await relay.run(last=ask == ASKS):
                            break
                        unsent = relay.unsent
                        if await _refused_again(channel, method, unsent, context):
                            break

    def _answered(self, kind: bytes, method: str, response: bytes) -> None:
        if method in CAPTURED_METHODS:
            self.sink.put_response(kind, response, time.time_ns())

    def _passed(self, method: str, request: bytes) -> None:
        if method in CAPTURED_METHODS:
            self.sink.put(request, time.time_ns())
        self.forwarded += 1

    @contextlib.asynccontextmanager
    async def _upstream(self, peer: str):
        """The channel to the cloud that carries this device connection's calls."""
        upstream = self._channels.get(peer)
        if upstream is None:
            if self.tls is None:
                channel = grpc.aio.insecure_channel(self.cloud, options=_UPSTREAM_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(self.cloud, self.tls.channel_credentials(), options=_UPSTREAM_OPTIONS)
            upstream = self._channels[peer] = _Upstream(channel)
        upstream.enter()
        try:
            yield upstream.channel
        finally:
            if upstream.leave():
                upstream.close_at = asyncio.get_running_loop().call_later(LINGER_S, self._close, peer, upstream)

    def _close(self, peer: str, upstream: _Upstream) -> None:
        if self._channels.get(peer) is upstream:
            del self._channels[peer]
        asyncio.ensure_future(upstream.channel.close())

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for upstream in channels:
            if upstream.close_at is not None:
                upstream.close_at.cancel()
            await upstream.channel.close()


class _Relay:
    """One stream both ways: the device's requests up, the cloud's answers down, then the cloud's status.

    It is idle when no message has gone either way for the idle timeout: the device's requests are read through a
    serving.Watch that each answer relayed touches."""

    def __init__(self, context, call, gate: serving.Gate, passed, answered, unsent: bytes | None) -> None:
        self.context, self.call, self.gate = context, call, gate
        self.idle_s = gate.limits.idle_timeout_s
        self.passed = passed  # called with each request on its way to the cloud
        self.answered = answered  # called with each answer on its way to the device
        # The device's first request when an earlier call to the cloud ended before taking it: sent first, not re-read.
        self.unsent = unsent
        self.taken = False  # whether the cloud has taken a request or sent an answer on this call
        self.watch: serving.Watch | None = None  # while _up reads

    async def run(self, last: bool) -> bool:
        """Relay until the cloud ends the call; raises Idle, Stalled or Stopping for the gate to end the stream.

        Returns False, unless `last`, when the cloud ended the call before it took the device's first request or sent
        anything. The status then seen is not the cloud's but the client library's own INTERNAL "Internal error from
        Core" for the write it refused (grpc/grpc#36066), and the caller asks the cloud again: nothing has reached the
        device or the cloud yet."""
        up, down = asyncio.ensure_future(self._up()), asyncio.ensure_future(self._down())
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up.done() and up.exception() is None:
                await asyncio.wait({down})  # the device has sent all it will: relay the rest of the answers
            stopped = up.done() and up.result()  # raises Idle
            down.result()
        except grpc.RpcError as e:
            if self.unsent is not None and not self.taken and not last:
                return False
            _relay_error(self.context, e)
            return True
        finally:
            up.cancel()
            down.cancel()
            self.call.cancel()
        self.context.set_trailing_metadata(tuple(await self.call.trailing_metadata()))
        if stopped:
            raise serving.Stopping()
        return True

    async def _up(self) -> bool:
        """The device's requests to the cloud, until it has sent its last; True if the proxy stopped first."""
        stopped = False
        try:
            async with serving.Watch(self.gate, self.context, self.idle_s) as self.watch:
                if self.unsent is not None:
                    await self._write(self.unsent)
                while True:
                    try:
                        request = await self.watch.read()
                    except serving.Stopping:
                        stopped, request = True, None
                    if request is None:
                        await self.call.done_writing()
                        return stopped
                    self.passed(request)
                    await self._write(request)
        except (grpc.RpcError, asyncio.InvalidStateError):
            return stopped  # the cloud has ended the call; _down relays how

    async def _write(self, request: bytes) -> None:
        """Pass one request on; keeps it as unsent if the cloud ended the call before taking any."""
        try:
            await self.call.write(request)
        except grpc.RpcError:
            if not self.taken:
                self.unsent = request
            raise
        self.taken = True

    async def _down(self) -> None:
        # The cloud's headers go down with its first answer, or with its status: a call the cloud refuses at once
        # (an unknown method) then ends trailers-only through the proxy as it does direct, where headers sent ahead of
        # the refusal raced the status and came back now and then as INTERNAL.
        headers_sent = False
        async with serving.Watch(self.gate, self.context, self.idle_s) as out:  # its writes: Stalled past the timeout
            while (response := await self.call.read()) is not grpc.aio.EOF:
                self.taken = True
                if not headers_sent:
                    await self.context.send_initial_metadata(await self.call.initial_metadata())
                    headers_sent = True
                if self.watch is not None:
                    self.watch.touch()
                self.answered(response)
                await out.write(response)
        if not headers_sent:
            await self.context.send_initial_metadata(await self.call.initial_metadata())


class _Upstream:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.calls = 0
        self.close_at: asyncio.TimerHandle | None = None

    def enter(self) -> None:
        self.calls += 1
        if self.close_at is not None:
            self.close_at.cancel()
            self.close_at = None

    def leave(self) -> bool:
        """True when that was its last call."""
        self.calls -= 1
        return self.calls == 0


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


def _metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, str | bytes]]:
    return [(key, value) for key, value in context.invocation_metadata() if not key.startswith(_HOP_BY_HOP)]


async def _refused_again(channel: grpc.aio.Channel, method: str, request: bytes, context) -> bool:
    """Ask the cloud once more with `request` sent along with the call, which reports the cloud's own status even when
    the cloud refuses the call at once; if it does, relay that status and return True.

    False if the cloud takes the call this time (a refusal that has passed, such as a full cloud): the call is then
    cancelled and the caller opens a stream again, as the device's call may carry more requests."""
    call = channel.unary_stream(method)(request, timeout=_timeout(context), metadata=_metadata(context))
    try:
        await call.read()
    except grpc.RpcError as e:
        _relay_error(context, e)
        return True
    finally:
        call.cancel()
    return False


def _relay_error(context: grpc.aio.ServicerContext, error: grpc.RpcError) -> None:
    """The cloud's status as the call's own (set, not raised: see serving.Gate.fail)."""
    context.set_trailing_metadata(tuple(error.trailing_metadata() or ()))
    context.set_code(error.code())
    context.set_details(error.details() or "")


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
    parser.add_argument(
        "--listen-port", type=serving.port_number, default=8001, help="where the device connects; 0 picks a free one"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cloud", type=serving.target, required=True, metavar="HOST:PORT", help="the real cloud")
    parser.add_argument("--capture", type=Path, help="capture folder to write (must not hold one)")
    parser.add_argument(
        "--feed", metavar="HOST:PORT", help="also send every captured request, as it happens, to a consumer there"
    )
    parser.add_argument("--dataset", help="the data set the device's frames come from, if known (for scoring)")
    parser.add_argument(
        "--queue", type=serving.positive_int, default=1024, help="requests waiting to be written before copies drop"
    )
    serving.Limits.add_arguments(parser)
    Tls.add_arguments(parser, "proxy")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.capture is None and args.feed is None:
        print("proxy: say where the captures go: --capture DIR, --feed HOST:PORT, or both", file=sys.stderr)
        return 2
    tls = Tls.from_args(args, "proxy")
    # Asked once, at the start: a cloud that speaks TLS to a proxy with no key the device trusts gets a relay of
    # ciphertext, which is all such a man in the middle can be.
    opaque = tls is None and speaks_tls(args.cloud) is True
    try:
        serving.check_port(args.host, args.listen_port)  # before the capture folder is made, so a retry finds none
    except OSError as e:
        print(f"proxy: {e}", file=sys.stderr)
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
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(logging.Formatter("proxy: %(message)s"))
    log.addHandler(errors)
    log.propagate = False
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if opaque:
        return relay_ciphertext(stop, args, writer or None, feed or None)
    sink = CaptureSink(writer, maxsize=args.queue, on_capture=[feed] if feed else None)
    limits = serving.Limits.from_args(args)
    proxy = Proxy(args.cloud, sink, host=args.host, port=args.listen_port, limits=limits, tls=tls)
    code = 0
    try:
        port = proxy.start()
    except OSError as e:
        print(f"proxy: {e}", file=sys.stderr)
        code = 2
    else:
        taps = [f"capturing to {args.capture}"] * bool(args.capture) + [f"feeding {args.feed}"] * bool(args.feed)
        wire = " over mutual TLS with keys of its own" if tls else ""
        print(
            f"proxy listening on {args.host}:{port} forwarding to {args.cloud}{wire}, {' and '.join(taps)}", flush=True
        )
        stop.wait()
        proxy.stop()
    sink.close()
    stats = proxy.stats | (feed.stats if feed else {})
    if feed:
        feed.close()
    print("proxy stopped: " + ", ".join(f"{k} {v}" for k, v in stats.items()), file=sys.stderr, flush=True)
    return code
