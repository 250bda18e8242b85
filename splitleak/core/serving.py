"""What the cloud and the attacker's proxy share as gRPC servers: the bounds that keep one client from starving the
others, how a stream waits for its next message, how a port is taken, and how a client's strings appear in messages.

Both are grpc.aio servers: an open stream is a coroutine parked on the event loop, not a thread held, so streams that
send nothing cost a little memory and no service, and health checks are answered whatever the streams are doing.
What is still bounded, each with RESOURCE_EXHAUSTED and a message that names the bound:

- open inference calls (ModelInfer and ModelStreamInfer) per connection, `MAX_STREAMS_PER_CONNECTION` (16): a device
  needs one stream at a time; 16 leaves room for a gateway or a test harness that carries a few devices on one
  connection, and keeps one connection from taking more than a sixteenth of the server;
- open inference calls in all, `MAX_STREAMS` (256): at the 2,100 frames/s two busy cores answer at the default split
  (docs/cloud.md), 256 devices with a frame each in flight wait some 120 ms a frame, four frames of a 30 frames/s
  camera; more would only wait longer, so past it the cloud says so instead;
- a stream that sends nothing for `IDLE_TIMEOUT_S` (60 s) while it has every answer is closed (DEADLINE_EXCEEDED),
  and one that reads none of its answers for as long is dropped: a device at 1 frame/s over the simulated 3G link
  (a 64 KiB activation takes half a second) sends every second and a half, and switching split builds a head in
  well under a second, so a minute of silence is forty frames missed; a slot held longer is one another device lacks;
- on SIGTERM, streams stop taking messages: what was received is answered, a stream then ends UNAVAILABLE (resend
  elsewhere), and everything still open after `GRACE_S` (10 s) is cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from splitleak.core.options import address, host_port, number
from splitleak.core.tls import Tls

MAX_STREAMS = 256
MAX_STREAMS_PER_CONNECTION = 16
IDLE_TIMEOUT_S = 60.0
GRACE_S = 10.0
# An error message travels as the grpc-message trailer, which gRPC refuses past 8 KiB of metadata (and percent-encodes,
# up to three bytes a character): 1,024 characters stay well inside, and say what was wrong and what was expected.
MAX_MESSAGE_CHARS = 1024
# A client's strings (names, versions, datatypes) are cut to this in messages: longer than any name the cloud serves.
QUOTE_CHARS = 64
# One log line per error answered: room for the peer, the method and the start of the message (the client has it all).
MAX_LOG_CHARS = 300

STOPPING = "the server is shutting down: this stream takes no more requests, and those not answered were not run"


def quote(value: str) -> str:
    """A client's string for a message: printable ASCII (the rest escaped), cut to QUOTE_CHARS with its length said."""
    # Cut first: escaping all of a 20 MiB name would make a string of 4 to 10 times that.
    quoted = ascii(value[:QUOTE_CHARS])
    if len(value) <= QUOTE_CHARS:
        return quoted
    return f"{quoted}... ({len(value)} characters, cut to {QUOTE_CHARS})"


def quote_all(values, most: int = 4) -> str:
    """A list of a client's strings or numbers for a message: each quoted, and no more than `most` of them."""
    shown = [quote(v) if isinstance(v, str) else str(v) for v in list(values[:most])]
    more = f", ... ({len(values)} in all)" if len(values) > most else ""
    return f"[{', '.join(shown)}{more}]"


def clip(text: str, most: int = MAX_MESSAGE_CHARS) -> str:
    """One line of at most `most` characters."""
    line = " ".join(text.split("\n"))
    return line if len(line) <= most else line[: most - 30] + f"... (cut to {most} characters)"


@dataclass(frozen=True)
class Limits:
    max_streams: int = MAX_STREAMS
    max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION
    idle_timeout_s: float = IDLE_TIMEOUT_S
    grace_s: float = GRACE_S

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--max-streams", type=positive_int, default=MAX_STREAMS, help="open inference calls")
        parser.add_argument(
            "--max-streams-per-connection",
            type=positive_int,
            default=MAX_STREAMS_PER_CONNECTION,
            help="open inference calls on one connection",
        )
        parser.add_argument(
            "--idle-timeout", type=positive_float, default=IDLE_TIMEOUT_S, help="seconds a stream may send nothing"
        )
        parser.add_argument(
            "--grace", type=non_negative_float, default=GRACE_S, help="seconds open calls get to finish on SIGTERM"
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Limits:
        return cls(args.max_streams, args.max_streams_per_connection, args.idle_timeout, args.grace)


class Idle(Exception):
    """The client sent nothing for the idle timeout."""


class Stopping(Exception):
    """The server began to stop while the stream waited for its next message."""


class Stalled(Exception):
    """The client read none of its answers for the idle timeout."""


class Gate:
    """Every call a server counts passes here: the bounds, the end of an idle or stalled stream, one log line per
    error answered, and the event that tells open streams the server is stopping."""

    def __init__(self, limits: Limits, log: logging.Logger, what: str) -> None:
        self.limits = limits
        self.log = log
        self.what = what  # what the server calls itself in messages
        self.stopping = asyncio.Event()
        self.open: Counter[str] = Counter()  # open counted calls by connection (the peer's address and port)
        self.watches: set[Watch] = set()  # the open streams that read through a Watch

    def stop(self) -> None:
        """Tell open streams the server is stopping: those waiting for a request end now, the others once they have
        sent the answer they are working on."""
        self.stopping.set()
        for watch in list(self.watches):
            watch.end_if_waiting("read", Stopping())

    @property
    def total(self) -> int:
        return sum(self.open.values())

    @contextlib.asynccontextmanager
    async def call(
        self, context: grpc.aio.ServicerContext, method: str, *, counted: bool = True
    ) -> AsyncIterator[bool]:
        """Admit a call and yield True, or set RESOURCE_EXHAUSTED and yield False; then end it as its stream's fate
        says (Idle, Stopping, Stalled), with the status set and the handler left to return."""
        peer = context.peer()
        refusal = self._refusal(peer) if counted else None
        if refusal is not None:
            self.fail(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            yield False
            return
        self.open[peer] += counted
        try:
            yield True
        except Idle:
            message = f"no request for {self.limits.idle_timeout_s:g} s; a stream idle that long is closed"
            self.fail(context, method, grpc.StatusCode.DEADLINE_EXCEEDED, message)
        except Stopping:
            self.fail(context, method, grpc.StatusCode.UNAVAILABLE, STOPPING)
        except Stalled:
            self.error(peer, method, grpc.StatusCode.CANCELLED, "dropped: read no answer for the idle timeout")
            # Its status cannot be sent: it waits behind the answers the client does not read. Cancelling the
            # handler is the one way gRPC offers to let go of it.
            raise asyncio.CancelledError() from None
        finally:
            self.open[peer] -= counted
            if not self.open[peer]:
                del self.open[peer]

    def _refusal(self, peer: str) -> str | None:
        if self.open[peer] >= self.limits.max_streams_per_connection:
            return (
                f"this connection already has {self.open[peer]} inference calls open, the most one connection may "
                f"have on this {self.what} (--max-streams-per-connection {self.limits.max_streams_per_connection})"
            )
        if self.total >= self.limits.max_streams:
            return (
                f"the {self.what} already has {self.total} inference calls open, the most it takes "
                f"(--max-streams {self.limits.max_streams}); try again when one has ended"
            )
        return None

    def fail(self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, message: str) -> None:
        """Set the call's status, for the handler to return with, and log it.

        Set, never raised with context.abort: an abort's exception holds the handler's frame, and with it the
        request, in a reference cycle through the call's state that only the garbage collector frees: raised, each
        round of sixteen refused 20 MiB requests left about 400 MB more held (bench/cloud_fuzz.py)."""
        message = clip(message)
        self.error(context.peer(), method, code, message)
        context.set_code(code)
        context.set_details(message)

    def error(self, peer: str, method: str, code: grpc.StatusCode, message: str) -> None:
        self.log.warning(clip(f"{peer} {method} {code.name}: {message}", MAX_LOG_CHARS))


class Watch:
    """A stream's reads and writes, ended by the idle timeout (Idle, Stalled) or by the server stopping (Stopping),
    at no cost per message: the handler awaits the read or the write itself, and one timer per stream, moved on only
    when it fires, cancels the handler when it has waited too long. (A timeout and a wait on the stop event around
    each read and write, in tasks of their own, cost about a sixth of a small frame's round trip at `layer3`.) A read
    cancelled so is lost, which only ever happens as the stream ends.

    Use it as `async with Watch(gate, context, idle_s) as stream:`, in the task that reads: the one it cancels."""

    def __init__(self, gate: Gate, context: grpc.aio.ServicerContext, idle_s: float) -> None:
        self._gate, self._context, self._idle_s = gate, context, idle_s
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._waiting: str | None = None  # "read" or "write" while the handler awaits one
        self._since = self._loop.time()  # when it began to
        self._ended: Exception | None = None  # why the timer or the gate cancelled the handler
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> Watch:
        self._timer = self._loop.call_later(self._idle_s, self._check)
        self._gate.watches.add(self)
        return self

    async def __aexit__(self, *exc) -> None:
        self._timer.cancel()
        self._gate.watches.discard(self)

    async def read(self) -> bytes | None:
        """The next request; None when the client has sent its last. Raises Idle or Stopping."""
        if self._gate.stopping.is_set():  # every request received has been answered
            raise Stopping()
        message = await self._wait("read", self._context.read())
        return None if message is grpc.aio.EOF else message

    async def write(self, message: bytes) -> None:
        """Send one answer; Stalled if the client has taken none for the idle timeout and the buffers are full."""
        await self._wait("write", self._context.write(message))

    async def _wait(self, what: str, awaitable):
        self._waiting, self._since = what, self._loop.time()
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._ended is None:  # the call itself was cancelled
                raise
            self._task.uncancel()
            raise self._ended from None
        finally:
            self._waiting = None

    def touch(self) -> None:
        """A message went the other way (the proxy's answers): the stream is not idle."""
        self._since = self._loop.time()

    def end_if_waiting(self, what: str, why: Exception) -> None:
        if self._waiting == what and self._ended is None:
            self._ended = why
            self._task.cancel()

    def _check(self) -> None:
        left = self._since + self._idle_s - self._loop.time()
        if self._waiting is not None and left <= 0:
            self.end_if_waiting(self._waiting, Idle() if self._waiting == "read" else Stalled())
            return
        self._timer = self._loop.call_later(left if self._waiting is not None else self._idle_s, self._check)


def listen(server: grpc.aio.Server, host: str, port: int, tls: Tls | None = None) -> int:
    """Bind `server` to host:port (0: any free port), with mutual TLS if given; returns the port. OSError, in one
    line, if it cannot."""
    check_port(host, port)
    where = host_port(host, port)
    try:
        if tls is not None:
            return server.add_secure_port(where, tls.server_credentials())
        return server.add_insecure_port(where)
    except RuntimeError:
        raise OSError(f"cannot listen on {where}: the address is not this machine's, or the port is taken") from None


def check_port(host: str, port: int) -> None:
    """OSError, in one line, if host:port cannot be listened on; asked before gRPC, which would log lines of its own."""
    if not port:
        return
    try:
        # SO_REUSEADDR as gRPC sets it: a port with old connections in TIME_WAIT is free, one with a listener is not.
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


# Command-line values, checked where argparse reads them so that a bad one is one line of usage, not a traceback.


def port_number(text: str) -> int:
    port = number(int)(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port: 1 to 65535, or 0 for any free one")
    return port


def target(text: str) -> str:
    """HOST:PORT of a server to connect to."""
    try:
        host, port = address(text)
    except ValueError:
        host, port = "", 0
    if not host or not 1 <= port <= 65535 or any(c.isspace() for c in host):
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (a port from 1 to 65535)")
    return text


# Numbers with a range: splitleak.core.options.number, shared with the device's options.
positive_int = number(int, at_least=1)
positive_float = number(float, above=0)
non_negative_float = number(float, at_least=0)
