"""The live feed: what a tap captures, sent as it happens to one consumer over a TCP connection.

`splitleak attacker proxy --feed HOST:PORT` and `splitleak cloud --feed HOST:PORT` connect to a consumer listening
there (the live attack demo, say) and
sends it every request it captures, framed exactly as the records of a capture's `requests.bin`
(splitleak.core.capture: a little-endian `uint32` length, an `int64` captured_ns, then the serialized
`inference.ModelInferRequest`), so whatever reads a capture reads the feed. Nothing is written to disk, so a tap can
feed for hours at camera rate.

The sender has a bounded queue and a thread of its own: a consumer that falls behind, or goes away, loses records
(counted in `dropped`) and never slows the tap, let alone the device.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator

from splitleak.core.capture import RECORD_HEADER
from splitleak.core.options import address as host_and_port


class FeedSender:
    """Sends every record it is handed to the consumer at `address` (HOST:PORT); an OnCapture for a CaptureSink."""

    def __init__(self, address: str, *, maxsize: int = 256, timeout_s: float = 10.0) -> None:
        self.address = address
        self._socket = socket.create_connection(host_and_port(address), timeout=timeout_s)
        self._socket.settimeout(None)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one record at a time, at once
        self.sent = 0
        self.dropped = 0
        self.connected = True  # False once the consumer has gone
        self._queue: queue.Queue[tuple[bytes, int] | None] = queue.Queue(maxsize=maxsize)
        self._thread = threading.Thread(target=self._send, name="capture-feed", daemon=True)
        self._thread.start()

    def __call__(self, request_bytes: bytes, captured_ns: int) -> None:
        if not self.connected:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait((request_bytes, captured_ns))
        except queue.Full:
            self.dropped += 1

    @property
    def stats(self) -> dict[str, int]:
        return {"fed": self.sent, "feed_dropped": self.dropped}

    def close(self) -> None:
        """Send what is queued (if the consumer is still there), then hang up."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._socket.close()

    def _send(self) -> None:
        while (item := self._queue.get()) is not None:
            request_bytes, captured_ns = item
            try:
                self._socket.sendall(RECORD_HEADER.pack(len(request_bytes), captured_ns) + request_bytes)
            except OSError:
                self.connected = False
                self.dropped += 1 + self._queue.qsize()
                return
            self.sent += 1


def receive(connection: socket.socket) -> Iterator[tuple[int, bytes]]:
    """The records arriving on a connection from a FeedSender, as (captured_ns, request bytes), until it closes."""
    with connection.makefile("rb") as stream:
        while len(header := stream.read(RECORD_HEADER.size)) == RECORD_HEADER.size:
            length, captured_ns = RECORD_HEADER.unpack(header)
            request_bytes = stream.read(length)
            if len(request_bytes) < length:
                return  # the sender went away mid-record
            yield captured_ns, request_bytes
