"""The device's stream to the cloud over Triton's ModelStreamInfer, carried across breaks: no frame lost or doubled.

Any Open Inference Protocol server will do (`Cloud`'s `stream`): splitleak's cloud and Triton take Triton's stream,
whose answers are ModelStreamInferResponses that carry errors in-band; MLServer's stream has the same name and
requests but answers with bare ModelInferResponses, all with the id of the call's first request, in order, and ends
the stream on an error ("oip"); a server without a stream (KServe) gets one unary ModelInfer a frame. A stock server
takes only the FP32 activation, so a defence that sends another form is refused before the first frame
(`Cloud.refusal`).

A break is the cloud (or a proxy in front of it) going away: the call fails (UNAVAILABLE, a connection reset: any
status but those that say the request itself is wrong, FATAL), or it ends before every frame is answered, or the
cloud answers a frame in-band with an `error_message` that begins "UNAVAILABLE", as a draining cloud rejects what it
will no longer run. On such a rejection the device stops sending on that stream but reads it to its end, so that what
the cloud took is still answered. Then it connects again on a fresh channel, waiting 0.1 s, doubling up to 2 s,
before each attempt, checks that the cloud serves the head's tail, and sends again, in order, every frame not yet
answered (splitleak.device.frames keeps the books). It gives up `reconnect_s` seconds after the break (0: at the
break) with a DeviceError; the clock starts again once a frame is answered on the new stream. Every other in-band
error (a bad request: NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED) answers its frame with that error, since
sending it again would get the same.

However a stream ends (done, failed, or interrupted by a signal), the producer's thread is stopped and joined, the
call cancelled and its request iterator ended before control returns: a gRPC thread left inside the iterator when the
interpreter exits aborts the process ("terminate called without an active exception").
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import grpc
import numpy as np

from splitleak.core import codec, defences, link, transport
from splitleak.core.records import FrameRecord
from splitleak.core.tls import Tls
from splitleak.core.tls import why_unreachable as tls_why_unreachable
from splitleak.device.control import Control
from splitleak.device.frames import MAX_UNANSWERED, Ledger, Pacer, Producer, complete
from splitleak.device.head import Head
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc

# Statuses that say the request itself is wrong: sending it again on a new stream would get the same.
FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
GOING_AWAY = "UNAVAILABLE"  # an in-band error_message so begun: this cloud will not run the frame, another may
BACKOFF_S = (0.1, 2.0)  # the first wait before a reconnect attempt, and the longest
ATTEMPT_S = 5.0  # how long one reconnect attempt may take to get the cloud's answer


class DeviceError(RuntimeError):
    """The device cannot go on: the message says why, for the user."""


class _Break(Exception):
    """The stream broke in a way another stream may not: the message says how."""


def check_cloud(
    stub: pb_grpc.GRPCInferenceServiceStub,
    head: Head,
    target: str,
    timeout_s: float,
    wait_for_ready: bool = True,
    tls: Tls | None = None,
) -> None:
    """Fail with a clear message if the cloud is down, speaks TLS where the device does not (or the other way round),
    or serves a different tail. `wait_for_ready`: wait up to `timeout_s` for the cloud to come up; otherwise a
    refused connection fails at once."""
    try:
        meta = stub.ModelMetadata(
            pb.ModelMetadataRequest(name=head.served_name), timeout=timeout_s, wait_for_ready=wait_for_ready
        )
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            raise DeviceError(f"the cloud at {target} does not serve {head.served_name}: {e.details()}") from e
        why = tls_why_unreachable(target, tls)
        raise DeviceError(f"cannot reach the cloud at {target}: {why or e.code().name + ' ' + e.details()}") from e
    expected = [-1, *head.split.activation_shape]
    got = meta.inputs[0] if meta.inputs else None
    if got is None or list(got.shape) != expected or got.datatype != head.split.activation_datatype:
        raise DeviceError(
            f"the cloud's {head.served_name} takes {got}; this head sends {head.split.activation_datatype} {expected}"
        )


STREAMS = ("auto", "triton", "oip", "off")  # the device's --stream choices
# What --stream auto picks by the server's name in ServerMetadata; "off" for any other.
STREAM_OF_SERVER = {"splitleak": "triton", "triton": "triton", "mlserver": "oip"}
_STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


class Cloud:
    """The channel to the cloud (or a proxy in front of it), opened anew after a break: a fresh channel tries at
    once, where an old one may be waiting out gRPC's own reconnect backoff (up to two minutes).

    `tls`: mutual TLS, as the cloud (or proxy) wants it; None: plaintext.

    `stream`: "triton" sends frames over Triton's ModelStreamInfer (splitleak's cloud and Triton have it), "oip" over
    the ModelStreamInfer whose answers are bare ModelInferResponses (MLServer's), "off" one unary ModelInfer each (any
    OIP server has it: KServe has no streaming call), "auto" picks by the server's name in ServerMetadata
    (STREAM_OF_SERVER). `server` is that name ("" if not told)."""

    def __init__(self, target: str, tls: Tls | None = None, stream: str = "auto") -> None:
        if stream not in STREAMS:
            raise ValueError(f"stream {stream!r}: expected one of {', '.join(STREAMS)}")
        self.target = target
        self.tls = tls
        self.stream = stream
        self.server = ""
        self._channel: grpc.Channel | None = None
        self.stub: pb_grpc.GRPCInferenceServiceStub | None = None

    @property
    def mode(self) -> str:
        """How frames go: "triton", "oip" or "off", as asked or as --stream auto picked for this server."""
        return STREAM_OF_SERVER.get(self.server, "off") if self.stream == "auto" else self.stream

    def open_stream(self, requests) -> tuple[grpc.Call, Iterator[pb.ModelStreamInferResponse]]:
        """Begin a ModelStreamInfer call sending `requests`: (the call, to cancel it; its answers, read as Triton's)."""
        if self.mode == "triton":
            call = self.stub.ModelStreamInfer(requests)
            return call, call
        # The same method and requests, answered with what Triton would put in infer_response. MLServer gives every
        # answer of a call the id of the call's first request, so the order names the frame: it answers in order.
        sent: deque[str] = deque()

        def remembered():
            for request in requests:
                sent.append(request.id)
                yield request

        call = self._channel.stream_stream(
            _STREAM_METHOD,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )(remembered())

        def answers():
            for answer in call:
                answer.id = sent.popleft()
                yield pb.ModelStreamInferResponse(infer_response=answer)

        return call, answers()

    def connect(self, head: Head, timeout_s: float, wait_for_ready: bool = True) -> None:
        """Open a channel and check the cloud serves `head`'s tail (DeviceError if not)."""
        self.close()
        self._channel = transport.channel(self.target, self.tls)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        try:
            check_cloud(self.stub, head, self.target, timeout_s, wait_for_ready, self.tls)
            self.server = server_name(self.stub, timeout_s)
        except DeviceError:
            self.close()
            raise

    def describe(self) -> str:
        """Which server this is and how frames go to it, for the device's first line."""
        server = self.server or "an OIP server that does not say which"
        how = {
            "triton": "over Triton's ModelStreamInfer",
            "oip": "over a ModelStreamInfer that answers bare ModelInferResponses",
            "off": "one ModelInfer a frame",
        }[self.mode]
        return f"{server}, {how}" + (", picked by --stream auto" if self.stream == "auto" else "")

    def refusal(self, defence: defences.Defence, head: Head) -> str | None:
        """Why this cloud cannot take what `defence` sends, or None. splitleak's cloud restores every defended form;
        any other server takes only what its model's metadata declares: the FP32 activation alone, no form."""
        if self.server == "splitleak":
            return None
        tensors, form = defence.apply(np.zeros((1, *head.split.activation_shape), np.float32), np.random.default_rng())
        activation = tensors.get("activation")
        if set(tensors) == {"activation"} and activation.dtype == np.float32 and not form:
            if activation.shape[1:] == head.split.activation_shape:
                return None
        sent = ", ".join(f"{codec.datatype_of(t)} {name!r} {list(t.shape[1:])}" for name, t in tensors.items())
        return (
            f"defence {defence.name} sends {sent}{' with parameters ' + ', '.join(form) if form else ''}; "
            f"{self.server or 'the server'} at {self.target} takes only what its model declares, FP32 'activation' "
            f"{list(head.split.activation_shape)}: use splitleak's cloud for this defence, or one that keeps the "
            "FP32 activation (noise, dropout)"
        )

    def close(self) -> None:
        """Close the channel, which cancels any call on it."""
        if self._channel is not None:
            self._channel.close()
        self._channel = self.stub = None

    def __enter__(self) -> Cloud:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def server_name(stub: pb_grpc.GRPCInferenceServiceStub, timeout_s: float) -> str:
    """The server's name from ServerMetadata ("splitleak", "triton", ...); "" for one that does not answer it."""
    try:
        return stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=timeout_s).name
    except grpc.RpcError:
        return ""


class Stream:
    """One pass over the frames through the head, the defence and the cloud, across breaks. `records()` holds every
    frame's record so far, at any moment: after a failure or an interrupt too.

    `on_record` hears each record the moment its answer is back; `say` hears a line on each break, reconnect attempt
    and reconnection. With `rate` 0, `max_rate` caps the frames a second. `control` may switch head, link and defence
    between frames."""

    def __init__(
        self,
        head: Head,
        cloud: Cloud,
        *,
        rate: float = 0.0,
        max_rate: float = 0.0,
        link_profile: link.LinkProfile = link.PROFILES["loopback"],
        defence: defences.Defence | None = None,
        control: Control | None = None,
        seed: int = 0,
        reconnect_s: float = 0.0,
        on_record: Callable[[FrameRecord], None] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        uplink, self.downlink = link.Link(link_profile, seed), link.Link(link_profile, seed + 1)
        defence = defence or defences.build("none", split=head.split)
        self.cloud = cloud
        self.pacer = Pacer(rate, max_rate)
        self.ledger = Ledger(uplink, in_flight=MAX_UNANSWERED if rate > 0 else 1)
        self.producer = Producer(head, defence, control, uplink, self.downlink, seed)
        self.reconnect_s = reconnect_s
        self.on_record = on_record or (lambda record: None)
        self.say = say or (lambda line: None)
        self.reconnects = 0
        self._broken_since: float | None = None  # time.monotonic() of the break not yet mended by an answer

    def records(self) -> list[FrameRecord]:
        return self.ledger.records()

    @property
    def duplicates(self) -> int:
        return self.ledger.duplicates

    def run(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        """Stream the frames until each is answered; DeviceError if the cloud cannot answer them."""
        self.producer.start(zip(indices, images, labels, strict=True), self.pacer, self.ledger)
        try:
            while (why := self._stream()) is not None:
                answered, unanswered = self.ledger.counts()
                lost = f"the stream to the cloud at {self.cloud.target} broke after {answered} of {len(indices)} frames"
                if self.reconnect_s <= 0:
                    raise DeviceError(f"{lost} ({why}); not reconnecting (reconnect budget 0 s)")
                self.say(f"{lost} ({why}); reconnecting ({unanswered} frames unanswered)")
                self._reconnect()
        finally:
            self.ledger.stop()
            self.producer.join()
        if self.producer.failure is not None:
            raise self.producer.failure

    def _stream(self) -> str | None:
        """One call: None once every frame is answered, or why it broke."""
        if self.cloud.mode == "off":
            return self._unary()
        closed = threading.Event()
        call, answers = self.cloud.open_stream(self.ledger.requests(closed))
        why = "the cloud ended the stream"
        try:
            for response in answers:
                if response.error_message.startswith(GOING_AWAY):
                    why = f"the cloud is going away: {response.error_message}"
                    self.ledger.close(closed)  # and read on: what the cloud took is still answered
                    continue
                self._answer(response)
                if self.ledger.finished():
                    return None
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise DeviceError(
                    f"the cloud at {self.cloud.target} has no ModelStreamInfer ({e.details()}); "
                    "send one ModelInfer a frame with --stream off"
                ) from e
            if e.code() in FATAL:
                raise DeviceError(
                    f"the cloud at {self.cloud.target} refused the stream: {e.code().name} {e.details()}"
                ) from e
            return f"{e.code().name} {e.details()}"
        finally:
            self.ledger.close(closed)
            call.cancel()
        return None if self.ledger.finished() else why

    def _unary(self) -> str | None:
        """The frames one ModelInfer each, in order (so one in flight at a time, whatever the rate): None once every
        frame is answered, or why it broke. A refused frame is answered with its status, as an in-band error."""
        closed = threading.Event()
        try:
            for request in self.ledger.requests(closed):
                try:
                    answer = pb.ModelStreamInferResponse(infer_response=self.cloud.stub.ModelInfer(request))
                except grpc.RpcError as e:
                    if e.code() not in FATAL:
                        return f"{e.code().name} {e.details()}"
                    error = f"{e.code().name}: {e.details()}"
                    answer = pb.ModelStreamInferResponse(
                        error_message=error, infer_response=pb.ModelInferResponse(id=request.id)
                    )
                self._answer(answer)
                if self.ledger.finished():
                    return None
        finally:
            self.ledger.close(closed)
        return None if self.ledger.finished() else "the requests ended unanswered"

    def _answer(self, response: pb.ModelStreamInferResponse) -> None:
        request_id = response.infer_response.id
        if not self.ledger.sent(request_id):
            # MLServer's stream answers with bare ModelInferResponses: read as Triton's, the model's name lands in
            # error_message and no answer names a frame. Nothing that follows would either.
            raise DeviceError(
                f"the cloud at {self.cloud.target} answered a frame it was never sent (id {request_id[:40]!r}, "
                f"error {response.error_message[:80]!r}): its ModelStreamInfer is not Triton's; use --stream oip "
                "(bare ModelInferResponse answers, as MLServer's) or --stream off"
            )
        record = self.ledger.record(request_id)
        if record is None:
            return  # answered before: a duplicate, counted by the ledger
        record = complete(record, response, self.downlink)
        self.ledger.answer(request_id, record)
        self._broken_since = None
        self.on_record(record)

    def _reconnect(self) -> None:
        """Connect again, backing off, until the cloud answers or `reconnect_s` has passed since the break."""
        self.cloud.close()
        self._broken_since = self._broken_since or time.monotonic()
        backoff, attempt = BACKOFF_S[0], 0
        while True:
            left = self.reconnect_s - (time.monotonic() - self._broken_since)
            if left <= 0:
                raise DeviceError(
                    f"gave up on the cloud at {self.cloud.target}: no answer within {self.reconnect_s:g} s of the "
                    f"break ({attempt} attempts to reconnect)"
                )
            time.sleep(min(backoff, left))
            attempt += 1
            timeout_s = min(ATTEMPT_S, max(left - backoff, 0.1))
            try:
                self.cloud.connect(self.producer.head, timeout_s, wait_for_ready=False)
            except DeviceError as e:
                self.say(f"reconnect attempt {attempt} failed: {e}")
                backoff = min(backoff * 2, BACKOFF_S[1])
                continue
            self.reconnects += 1
            self.say(f"reconnected to {self.cloud.target} (attempt {attempt})")
            return
