"""The floor the transport is measured against: a bare grpcio server that answers every message with N bytes.

`bare.Echo/Call` answers one unary call with the reply; `bare.Echo/Stream` answers each message of a stream with
it, as the cloud's ModelStreamInfer answers each request: nothing is parsed, checked or run.

python bench/bare_echo.py REPLY_BYTES   # prints "listening on 127.0.0.1:PORT"
"""

import signal
import sys
import threading
from concurrent import futures

import grpc

from splitleak.core import transport


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
