"""The floor the transport is measured against: a bare grpcio server that answers every message with N bytes.

`bare.Echo/Call` answers one unary call with the reply; `bare.Echo/Stream` answers each message of a stream with
it, as the cloud's ModelStreamInfer answers each request: nothing is parsed, checked or run. By default the server is
grpcio's synchronous one (a thread per call); with `--aio` it is grpc.aio, as the cloud and the proxy are, so that
what the asyncio server itself costs can be told from what the cloud adds.

python bench/bare_echo.py REPLY_BYTES [--aio]   # prints "listening on 127.0.0.1:PORT"; or start() from a bench
"""

import asyncio
import queue
import re
import signal
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

from splitleak.core import transport


def start(reply_bytes: int, *, aio: bool = False) -> tuple[subprocess.Popen, int]:
    """This server as a process of its own (stop it with splitleak.core.process.stop), and its port."""
    cmd = [sys.executable, str(Path(__file__)), str(reply_bytes), *(["--aio"] if aio else [])]
    bare = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    return bare, int(re.search(r":(\d+)", bare.stdout.readline()).group(1))


def time_stream(benchmark, port: int, method: str, payload: bytes, *, rounds: int, warmup_rounds: int) -> None:
    """Time one round trip on one open stream to 127.0.0.1:`port` (`method`: the echo's, or the cloud's
    ModelStreamInfer), `payload` a serialized request; connected before the clock starts."""
    outbox: queue.Queue = queue.Queue()
    with transport.channel(f"127.0.0.1:{port}") as channel:
        answers = channel.stream_stream(method)(iter(outbox.get, None))

        def round_trip():
            outbox.put(payload)
            return next(answers)

        round_trip()
        benchmark.pedantic(round_trip, rounds=rounds, warmup_rounds=warmup_rounds)
        outbox.put(None)
        answers.cancel()


def serve_sync(reply: bytes) -> None:
    handler = grpc.method_handlers_generic_handler(
        "bare.Echo",
        {
            "Call": grpc.unary_unary_rpc_method_handler(lambda request, context: reply),
            "Stream": grpc.stream_stream_rpc_method_handler(lambda requests, context: (reply for _ in requests)),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=transport.OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


async def serve_aio(reply: bytes) -> None:
    async def call(request: bytes, context) -> bytes:
        return reply

    async def stream(requests, context) -> None:
        while await context.read() is not grpc.aio.EOF:  # as the cloud reads and writes its stream
            await context.write(reply)

    handler = grpc.method_handlers_generic_handler(
        "bare.Echo",
        {"Call": grpc.unary_unary_rpc_method_handler(call), "Stream": grpc.stream_stream_rpc_method_handler(stream)},
    )
    server = grpc.aio.server(options=transport.OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    reply = b"\0" * int(sys.argv[1])
    if "--aio" in sys.argv[2:]:
        asyncio.run(serve_aio(reply))
    else:
        serve_sync(reply)


if __name__ == "__main__":
    main()
