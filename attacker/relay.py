"""What the man in the middle gets when device and cloud speak mutual TLS and it holds no key the device trusts.

It can still stand where the device expects the cloud and pass the bytes on, both ways, so the device works as
before; but the bytes are TLS records, and without the cloud's private key (or a certificate the device's CA signed)
it can neither read them nor take the cloud's place in the handshake. `splitleak attacker proxy` runs this relay
when it finds that the cloud speaks TLS and it was given no TLS files of its own.

It keeps what it can: how many connections and bytes went each way, and the first bytes the devices sent
(`ciphertext.bin`, up to CIPHERTEXT_BYTES), in a capture folder whose meta.json says `"encrypted": true` and which
holds no requests; `splitleak attack` on it says why there is nothing to invert.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading

from splitleak.core.capture import CaptureWriter
from splitleak.core.feed import FeedSender
from splitleak.core.options import address

CIPHERTEXT_BYTES = 1 << 20
_CHUNK = 64 * 1024


class CiphertextRelay:
    """A TCP relay from host:port to `cloud`, on an event loop of its own on a thread (start/stop from plain code)."""

    def __init__(self, cloud: str, writer: CaptureWriter | None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.cloud_host, self.cloud_port = address(cloud)
        self.writer = writer
        self.host, self.port = host, port
        self.stats = {"connections": 0, "bytes_up": 0, "bytes_down": 0}
        self._kept = bytearray()  # the first bytes the devices sent
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._connections: set[asyncio.Task] = set()

    def start(self) -> int:
        """Start listening; returns the port. OSError if it cannot."""
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(self._relay, self.host, self.port), self._loop
            ).result()
        except OSError:
            self._end_loop()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def stop(self) -> None:
        """Stop listening, cut the connections, and close the capture with its counts."""
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result()
        self._end_loop()
        if self.writer is not None:
            (self.writer.path / "ciphertext.bin").write_bytes(bytes(self._kept))
            self.writer.meta.update(encrypted=True, **self.stats, ciphertext_kept=len(self._kept))
            self.writer.close()

    async def _stop(self) -> None:
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _relay(self, device_reader: asyncio.StreamReader, device_writer: asyncio.StreamWriter) -> None:
        self._connections.add(asyncio.current_task())
        self.stats["connections"] += 1
        writers = [device_writer]
        try:
            # Unreachable: the device's connection is closed, and it sees the cloud as unreachable, as directly.
            cloud_reader, cloud_writer = await asyncio.open_connection(self.cloud_host, self.cloud_port)
            writers.append(cloud_writer)
            await asyncio.gather(
                self._pipe(device_reader, cloud_writer, "bytes_up"),
                self._pipe(cloud_reader, device_writer, "bytes_down"),
            )
        except OSError:
            pass
        finally:
            for writer in writers:
                writer.close()
            self._connections.discard(asyncio.current_task())

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(_CHUNK):
                self.stats[counter] += len(chunk)
                if counter == "bytes_up" and len(self._kept) < CIPHERTEXT_BYTES:
                    self._kept += chunk[: CIPHERTEXT_BYTES - len(self._kept)]
                writer.write(chunk)
                await writer.drain()
        # One side has hung up: pass the half-close on, so the other side ends as it would directly.
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()


def run_until(
    stop: threading.Event, args: argparse.Namespace, writer: CaptureWriter | None, feed: FeedSender | None
) -> int:
    """`splitleak attacker proxy` as this relay, until `stop` is set; its exit code."""
    relay = CiphertextRelay(args.cloud, writer, host=args.host, port=args.listen_port)
    try:
        port = relay.start()
    except OSError as e:
        print(f"proxy: {e}", file=sys.stderr)
        return 2
    print(
        f"proxy listening on {args.host}:{port} relaying to {args.cloud}: the cloud speaks TLS and this proxy holds no "
        f"key the device trusts, so it passes on ciphertext it cannot read"
        + (f", keeping its counts and first bytes in {args.capture}" if writer else ""),
        flush=True,
    )
    stop.wait()
    relay.stop()
    if feed:
        feed.close()
    print("proxy stopped: " + ", ".join(f"{k} {v}" for k, v in relay.stats.items()), file=sys.stderr, flush=True)
    return 0
