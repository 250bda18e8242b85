"""The floor the transport is measured against: a bare grpcio server that answers every message with N bytes.

`bare.Echo/Call` answers one unary call with the reply; `bare.Echo/Stream` answers each message of a stream with
it, as the cloud's ModelStreamInfer answers each request: nothing is parsed, checked or run.

python bench/bare_echo.py REPLY_BYTES   # prints "listening on 127.0.0.1:PORT"; or start(REPLY_BYTES) from a bench
"""

import re
import signal
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

from splitleak.core import transport


def start(reply_bytes: int) -> tuple[subprocess.Popen, int]:
    """This server as a process of its own (stop it with splitleak.core.process.stop), and its port."""
    bare = subprocess.Popen([sys.executable, str(Path(__file__)), str(reply_bytes)], stdout=subprocess.PIPE, text=True)
    return bare, int(re.search(r":(\d+)", bare.stdout.readline()).group(1))


def main() -> None:
    reply = b"\0" * int(sys.argv[1])
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


if __name__ == "__main__":
    main()
