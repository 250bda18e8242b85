"""The device's frames and their books: each made on a thread of its own, and completed exactly once.

Each frame goes through preprocess -> head -> defence -> encode on the producer's thread, then crosses the simulated
uplink (splitleak.core.link) on its way to the cloud, and its answer crosses the simulated downlink back. With `rate`
0 one frame is in flight at a time (closed loop), as fast as the round trip allows and at most `max_rate` a second;
with `rate` R frames leave at R a second whether or not the answers are back (open loop), so a slow link queues them.

The ledger holds every frame made until it is answered, so that a stream that breaks loses none
(splitleak.device.stream sends them again on the next): a frame's record is completed by the first answer for it,
and an answer for a frame already answered is ignored and counted. A frame sent again is stamped again
(`device_send_ns`, in the request too) and counted in its record's `resent`. While no stream is open, an open loop
goes on making frames, which wait; at most MAX_UNANSWERED frames are unanswered at once (sent, or waiting to be),
after which the producer waits for answers: frames are never dropped, the rate falls behind instead.

Stage times: preprocess, head, defence and encode are timed on the device; uplink is from the device handing the
request to the link until the cloud received it, cloud is what the cloud reports, downlink is from the cloud sending
the answer until it arrived; from a cloud that reports no times (a stock OIP server), "network + cloud" is from the
device handing the request to the link until the answer arrived. Uplink and downlink compare the device's and the
cloud's wall clocks, so they are exact only when both share a clock (the same machine, as in every run here) or are
synchronised.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from splitleak.core import codec, defences, link
from splitleak.core.records import FrameRecord
from splitleak.device.control import Control
from splitleak.device.head import Head
from splitleak.protos import inference_pb2 as pb

CLOUD_TIMES = ("cloud_recv_ns", "cloud_send_ns", "cloud_compute_ms")  # what splitleak's cloud reports (core.codec)
MAX_UNANSWERED = 1024  # frames; 64 MiB of the largest activation here (ResNet-20's stem, 64 KiB)


def prepare(
    head: Head,
    defence: defences.Defence,
    rng: np.random.Generator,
    request_id: str,
    frame: int,
    image: np.ndarray,
    label: int,
    link_name: str,
) -> tuple[pb.ModelInferRequest, FrameRecord]:
    """One frame through preprocess, head, defence and encode, each timed: the request and the frame's record."""
    start_ns = time.time_ns()
    t0 = time.perf_counter()
    x = head.manifest.preprocess(image[None])
    t1 = time.perf_counter()
    activation = head.run(x)
    t2 = time.perf_counter()
    tensors, form = defence.apply(activation, rng)
    t3 = time.perf_counter()
    parameters = {"split_point": head.split.name, "frame_id": frame, "defence": defence.name}
    parameters |= {"defence_strength": defence.strength, **form}
    request = codec.encode_request(head.served_name, tensors, request_id=request_id, parameters=parameters)
    send_ns = time.time_ns()
    codec.set_parameters(request.parameters, {"device_send_ns": send_ns})
    t4 = time.perf_counter()
    record = FrameRecord(
        frame=frame,
        label=label,
        split=head.split.name,
        link=link_name,
        defence=defence.name,
        strength=defence.strength,
        start_ns=start_ns,
        preprocess_ms=(t1 - t0) * 1e3,
        head_ms=(t2 - t1) * 1e3,
        defence_ms=(t3 - t2) * 1e3,
        encode_ms=(t4 - t3) * 1e3,
        bytes_up=request.ByteSize(),
        device_send_ns=send_ns,
    )
    return request, record


def complete(record: FrameRecord, response: pb.ModelStreamInferResponse, downlink: link.Link) -> FrameRecord:
    """The frame's record with the cloud's answer, once the answer has crossed the downlink; or with its error.

    A cloud that does not report its times (a stock server: CLOUD_TIMES are splitleak's own parameters) gets the
    downlink from the answer's arrival, and the record the time from sending to that as "network + cloud"."""
    if response.error_message:
        return replace(record, error=response.error_message)
    params = codec.get_parameters(response.infer_response.parameters)
    timed = all(isinstance(params.get(key), int | float) for key in CLOUD_TIMES)
    sent_ns = params["cloud_send_ns"] if timed else time.time_ns()
    _sleep_until(downlink.arrival(response.ByteSize(), sent_ns / 1e9))
    end_ns = time.time_ns()
    logits = codec.decode_response(response.infer_response)["logits"]
    answered = replace(
        record,
        prediction=int(logits[0].argmax()),
        bytes_down=response.ByteSize(),
        end_ns=end_ns,
        total_ms=(end_ns - record.start_ns) / 1e6,
    )
    if not timed:
        return replace(answered, network_cloud_ms=(end_ns - record.device_send_ns) / 1e6)
    return replace(
        answered,
        uplink_ms=(params["cloud_recv_ns"] - record.device_send_ns) / 1e6,
        cloud_ms=params["cloud_compute_ms"],
        downlink_ms=(end_ns - params["cloud_send_ns"]) / 1e6,
    )


def _sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


@dataclass
class _Unanswered:
    request: pb.ModelInferRequest
    sent: bool = False  # on some stream: sending it again is a resend


class Ledger:
    """Every frame made so far: its latest record, and the request of each not yet answered, in the order made.

    The single place a frame's record is completed, and what a new stream sends again. The producer adds frames,
    a stream's request iterator takes them, the response loop answers them: each on its own thread."""

    def __init__(self, uplink: link.Link, in_flight: int) -> None:
        self.uplink = uplink
        self.in_flight = in_flight  # at most this many unanswered at once: 1 is the closed loop
        self.stopping = threading.Event()
        self.duplicates = 0
        self._records: dict[str, FrameRecord] = {}
        self._unanswered: dict[str, _Unanswered] = {}
        self._to_send: deque[str] = deque()  # on the current stream
        self._made_all = False
        self._changed = threading.Condition()

    def wait_for_room(self) -> bool:
        """Block until fewer than `in_flight` frames are unanswered; False if the stream is stopping."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._unanswered) < self.in_flight or self.stopping.is_set())
        return not self.stopping.is_set()

    def add(self, request_id: str, request: pb.ModelInferRequest, record: FrameRecord) -> None:
        with self._changed:
            self._records[request_id] = record
            self._unanswered[request_id] = _Unanswered(request)
            self._to_send.append(request_id)
            self._changed.notify_all()

    def made_all(self) -> None:
        """No more frames are coming: a stream's requests end once it has sent the rest."""
        with self._changed:
            self._made_all = True
            self._changed.notify_all()

    def stop(self) -> None:
        """Wake every wait, for good: the producer stops, and so does any stream's request iterator."""
        self.stopping.set()
        with self._changed:
            self._changed.notify_all()

    def requests(self, closed: threading.Event) -> Iterator[pb.ModelInferRequest]:
        """What one stream sends: every unanswered frame (again, after a break), then each new one, as the uplink
        delivers them. Ends once all are made and sent, or when `closed` is set (call `close`)."""
        with self._changed:
            if self._ended(closed):  # gRPC may start a stream's iterator late, after the next stream's has begun
                return
            self._to_send = deque(self._unanswered)
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._to_send or self._made_all or self._ended(closed))
                if self._ended(closed) or not self._to_send:
                    return
                request_id = self._to_send.popleft()
                request, arrival = self._hand_over(request_id)
            if closed.wait(max(arrival - time.time(), 0.0)):
                return  # lost in the link: it stays unanswered, for the next stream
            yield request

    def close(self, closed: threading.Event) -> None:
        """End the requests of the stream that `closed` belongs to."""
        closed.set()
        with self._changed:
            self._changed.notify_all()

    def sent(self, request_id: str) -> bool:
        """Whether a frame of this id was ever made (answered or not)."""
        with self._changed:
            return request_id in self._records

    def record(self, request_id: str) -> FrameRecord | None:
        """The record of a frame awaiting its answer; None for one already answered (counted: a duplicate)."""
        with self._changed:
            if request_id in self._unanswered:
                return self._records[request_id]
            self.duplicates += 1
            return None

    def answer(self, request_id: str, record: FrameRecord) -> None:
        with self._changed:
            self._records[request_id] = record  # before it leaves _unanswered: an interrupt between keeps it
            del self._unanswered[request_id]
            self._changed.notify_all()

    def finished(self) -> bool:
        with self._changed:
            return self._made_all and not self._unanswered

    def counts(self) -> tuple[int, int]:
        """(frames answered, frames unanswered)."""
        with self._changed:
            return len(self._records) - len(self._unanswered), len(self._unanswered)

    def records(self) -> list[FrameRecord]:
        """Every frame's record in the order made, those without an answer marked `unanswered`."""
        with self._changed:
            return [
                replace(record, unanswered=True) if request_id in self._unanswered else record
                for request_id, record in self._records.items()
            ]

    def _ended(self, closed: threading.Event) -> bool:
        return closed.is_set() or self.stopping.is_set()

    def _hand_over(self, request_id: str) -> tuple[pb.ModelInferRequest, float]:
        """The request to send and when it will have crossed the uplink; a frame sent before is stamped again, on a
        copy, since the call it went out on may still be serialising the old one."""
        unanswered, record = self._unanswered[request_id], self._records[request_id]
        if unanswered.sent:
            request = pb.ModelInferRequest()
            request.CopyFrom(unanswered.request)
            send_ns = time.time_ns()
            codec.set_parameters(request.parameters, {"device_send_ns": send_ns})
            unanswered.request = request
            record = self._records[request_id] = replace(record, device_send_ns=send_ns, resent=record.resent + 1)
        unanswered.sent = True
        return unanswered.request, self.uplink.arrival(record.bytes_up, record.device_send_ns / 1e9)


class Pacer:
    """When each frame may leave: with `rate` > 0, at that many a second from the first (open loop); otherwise as
    soon as it may, at most `max_rate` a second (if > 0), as a camera delivers frames."""

    def __init__(self, rate: float = 0.0, max_rate: float = 0.0) -> None:
        self.rate, self.max_rate = rate, max_rate
        self._start: float | None = None
        self._next = 0.0

    def due(self, i: int) -> float:
        """The wall-clock time frame `i` (counted from 0) may leave; call once per frame, in order."""
        now = time.time()
        if self.rate > 0:
            self._start = now if self._start is None else self._start
            return self._start + i / self.rate
        due = max(now, self._next)
        self._next = due + 1 / self.max_rate if self.max_rate > 0 else 0.0
        return due


class Producer:
    """Makes the frames on a thread of its own: paces them, applies control changes between them, prepares each and
    adds it to the ledger."""

    def __init__(
        self,
        head: Head,
        defence: defences.Defence,
        control: Control | None,
        uplink: link.Link,
        downlink: link.Link,
        seed: int,
    ) -> None:
        self.head, self.defence, self.control = head, defence, control
        self.uplink, self.downlink = uplink, downlink
        self.rng = np.random.default_rng(seed)  # the defence's randomness, reproducible per run
        self.failure: BaseException | None = None  # what stopped the thread before the frames ran out
        self._thread: threading.Thread | None = None

    def start(self, frames: Iterable[tuple[int, np.ndarray, int]], pacer: Pacer, ledger: Ledger) -> None:
        args = (frames, pacer, ledger)
        self._thread = threading.Thread(target=self._make, args=args, name="device-producer", daemon=True)
        self._thread.start()

    def _make(self, frames: Iterable[tuple[int, np.ndarray, int]], pacer: Pacer, ledger: Ledger) -> None:
        try:
            for i, (index, image, label) in enumerate(frames):
                if not ledger.wait_for_room() or ledger.stopping.wait(max(pacer.due(i) - time.time(), 0.0)):
                    return
                if self.control is not None:
                    self.head, self.defence = self.control.apply(self.uplink, self.downlink)
                request, record = prepare(
                    self.head, self.defence, self.rng, str(i), int(index), image, int(label), self.uplink.profile.name
                )
                ledger.add(str(i), request, record)
        except BaseException as e:  # noqa: BLE001 - the stream raises it in its own thread
            self.failure = e
        finally:
            ledger.made_all()

    def join(self) -> None:
        """Wait for the thread to end: the frames ran out, it failed, or the ledger stopped."""
        if self._thread is not None:
            self._thread.join()
