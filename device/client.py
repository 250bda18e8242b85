"""The device (`splitleak device`): runs the head with ONNX Runtime and streams activations to the cloud.

What a phone has: ONNX Runtime, numpy and gRPC. This module never imports torch (a test holds it to that).

Each frame goes through preprocess -> head -> defence -> encode on the device, then crosses the simulated uplink
(splitleak.core.link), is answered by the cloud over Triton's ModelStreamInfer stream, and crosses the simulated
downlink back. With `--rate 0` (the default) one frame is in flight at a time, as fast as the round trip allows;
with `--rate R` frames leave at R per second whether or not the answers are back, so a slow link queues them.

The defence (`--defence NAME --strength S`, splitleak.core.defences; `none` by default) transforms the activation before
it leaves the device, and its name and strength travel in every request: the cloud needs neither, but captures show
what was applied, as an adaptive attacker would know it.

Driven from outside (as `splitleak demo` drives it): `--loop` sends the frames again and again, `--max-rate` paces
them like a camera, `--control -` takes split, link and defence changes between frames (splitleak.device.control), and
`--records -` writes each frame's record as a JSON line the moment its answer is back.

Stage times: preprocess, head, defence and encode are timed on the device; uplink is from the device handing the request
to the link until the cloud received it, cloud is what the cloud reports, downlink is from the cloud sending the
answer until it arrived. Uplink and downlink compare the device's and the cloud's wall clocks, so they are exact
only when both share a clock (the same machine, as in every run here) or are synchronised.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np

from splitleak.core import codec, data, defences, link, manifest, metrics, transport
from splitleak.core.records import FrameRecord
from splitleak.device.control import Control
from splitleak.device.head import Head
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc


class DeviceError(RuntimeError):
    """The device cannot go on: the message says why, for the user."""


def load_frames(
    dataset: str, m: manifest.Manifest, limit: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, images resized to the model's input, labels) of `limit` frames drawn without replacement.

    Drawn at random because the shared data sets are stored grouped by class."""
    ds = data.load(dataset, "test")
    indices = np.random.default_rng(seed).permutation(len(ds))[:limit]
    channels, size = m.input_shape[0], m.input_shape[1]
    images = data.resize(ds.images[indices], size, channels)
    labels = ds.labels[indices] if tuple(ds.classes) == m.classes else np.full(len(indices), -1)
    return indices, images, labels


def check_cloud(stub: pb_grpc.GRPCInferenceServiceStub, head: Head, target: str, timeout_s: float = 10.0) -> None:
    """Fail early, with a clear message, if the cloud is down or serves a different tail."""
    try:
        meta = stub.ModelMetadata(
            pb.ModelMetadataRequest(name=head.served_name), timeout=timeout_s, wait_for_ready=True
        )
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            raise DeviceError(f"the cloud at {target} does not serve {head.served_name}: {e.details()}") from e
        raise DeviceError(f"cannot reach the cloud at {target}: {e.code().name} {e.details()}") from e
    expected = [-1, *head.split.activation_shape]
    got = meta.inputs[0] if meta.inputs else None
    if got is None or list(got.shape) != expected or got.datatype != head.split.activation_datatype:
        raise DeviceError(
            f"the cloud's {head.served_name} takes {got}; this head sends {head.split.activation_datatype} {expected}"
        )


def _sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)


class Pacer:
    """When each frame may leave: with `rate` > 0, at that many a second whether or not the answers are back (open
    loop); otherwise once the last frame's answer is back (closed loop), and at most `max_rate` a second (if > 0),
    as a camera delivers frames."""

    def __init__(self, rate: float = 0.0, max_rate: float = 0.0) -> None:
        self.rate, self.max_rate = rate, max_rate
        self._answered = threading.Semaphore(1)
        self._start: float | None = None
        self._next = 0.0

    def wait(self, i: int) -> None:
        """Block until frame `i` (counted from 0) may leave."""
        if self.rate > 0:
            self._start = self._start if self._start is not None else time.time()
            _sleep_until(self._start + i / self.rate)
            return
        self._answered.acquire()
        _sleep_until(self._next)
        self._next = time.time() + 1 / self.max_rate if self.max_rate > 0 else 0.0

    def answered(self) -> None:
        """A frame's answer is back: in the closed loop, the next frame may go."""
        self._answered.release()


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
    """The frame's record with the cloud's answer, once the answer has crossed the downlink; or with its error."""
    if response.error_message:
        return replace(record, error=response.error_message)
    params = codec.get_parameters(response.infer_response.parameters)
    _sleep_until(downlink.arrival(response.ByteSize(), params["cloud_send_ns"] / 1e9))
    end_ns = time.time_ns()
    logits = codec.decode_response(response.infer_response)["logits"]
    return replace(
        record,
        prediction=int(logits[0].argmax()),
        bytes_down=response.ByteSize(),
        end_ns=end_ns,
        uplink_ms=(params["cloud_recv_ns"] - record.device_send_ns) / 1e6,
        cloud_ms=params["cloud_compute_ms"],
        downlink_ms=(end_ns - params["cloud_send_ns"]) / 1e6,
        total_ms=(end_ns - record.start_ns) / 1e6,
    )


class Sender:
    """The sending side, on a thread of its own: paces the frames, applies control changes between them, prepares
    each, and hands gRPC the requests (`requests`) as the uplink delivers them. `sent` holds each frame's record, by
    request id, until its answer comes."""

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
        self.sent: dict[str, FrameRecord] = {}
        self._outbox: queue.Queue[tuple[float, pb.ModelInferRequest] | None] = queue.Queue()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, frames: Iterable[tuple[int, np.ndarray, int]], pacer: Pacer) -> None:
        self._thread = threading.Thread(target=self._send, args=(frames, pacer), name="device-producer", daemon=True)
        self._thread.start()

    def _send(self, frames: Iterable[tuple[int, np.ndarray, int]], pacer: Pacer) -> None:
        try:
            for i, (index, image, label) in enumerate(frames):
                pacer.wait(i)
                if self.control is not None:
                    self.head, self.defence = self.control.apply(self.uplink, self.downlink)
                request, record = prepare(
                    self.head, self.defence, self.rng, str(i), int(index), image, int(label), self.uplink.profile.name
                )
                self.sent[str(i)] = record
                self._outbox.put((self.uplink.arrival(record.bytes_up, record.device_send_ns / 1e9), request))
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by join()
            self._failure = e
        finally:
            self._outbox.put(None)

    def requests(self) -> Iterator[pb.ModelInferRequest]:
        """The requests as they come out of the uplink, until the frames run out."""
        while (item := self._outbox.get()) is not None:
            arrival, request = item
            _sleep_until(arrival)
            yield request

    def join(self) -> None:
        """Wait for the sending thread to end; raise what stopped it, if anything did."""
        self._thread.join(timeout=5)
        if self._failure is not None:
            raise self._failure


def stream(
    head: Head,
    stub: pb_grpc.GRPCInferenceServiceStub,
    indices: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    rate: float = 0.0,
    max_rate: float = 0.0,
    link_profile: link.LinkProfile = link.PROFILES["loopback"],
    defence: defences.Defence | None = None,
    control: Control | None = None,
    seed: int = 0,
    on_record: Callable[[FrameRecord], None] | None = None,
) -> list[FrameRecord]:
    """Stream the frames through the head, the defence (none by default) and the cloud; one record per frame,
    handed to `on_record` the moment its answer is back.

    With `rate` 0, `max_rate` caps the frames a second. `control` may switch head, link and defence between frames."""
    pacer = Pacer(rate, max_rate)
    uplink, downlink = link.Link(link_profile, seed), link.Link(link_profile, seed + 1)
    sender = Sender(head, defence or defences.build("none", split=head.split), control, uplink, downlink, seed)
    sender.start(zip(indices, images, labels, strict=True), pacer)
    done: list[FrameRecord] = []
    responses = stub.ModelStreamInfer(sender.requests())
    try:
        for response in responses:
            record = complete(sender.sent.pop(response.infer_response.id), response, downlink)
            done.append(record)
            if on_record is not None:
                on_record(record)
            pacer.answered()
            if len(done) == len(indices):
                break
    except grpc.RpcError as e:
        raise DeviceError(
            f"the cloud ended the stream after {len(done)} of {len(indices)} frames: {e.code().name} {e.details()}"
        ) from e
    finally:
        responses.cancel()
    sender.join()
    if len(done) < len(indices):
        raise DeviceError(f"the cloud closed the stream after {len(done)} of {len(indices)} frames")
    return done


def json_lines(path: str):
    """A writer of one JSON object a line to `path` ('-': stdout), flushed at once, safe to call from any thread."""
    out = sys.stdout if path == "-" else open(path, "a")
    lock = threading.Lock()

    def write(obj: dict) -> None:
        with lock:
            out.write(json.dumps(obj) + "\n")
            out.flush()

    return write


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", default="127.0.0.1:8001", metavar="HOST:PORT")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=manifest.DEFAULT_MODEL_DIR,
        help="an exported model (default: the shipped ResNet-20 on CIFAR-10)",
    )
    parser.add_argument("--split", help="split point (default: the model's default)")
    parser.add_argument("--dataset", default=None, help="default: cifar10 from the data root, else 'embedded'")
    parser.add_argument("--limit", type=int, default=200, help="frames to send")
    parser.add_argument("--rate", type=float, default=0.0, help="frames per second; 0: one in flight at a time")
    parser.add_argument("--max-rate", type=float, default=0.0, help="with --rate 0: at most this many frames a second")
    parser.add_argument("--loop", action="store_true", help="send the frames again and again until stopped")
    parser.add_argument(
        "--control",
        metavar="FILE",
        help="take split, link and defence changes as JSON lines from FILE ('-': stdin) between frames; "
        "the device stops when FILE ends",
    )
    parser.add_argument("--records", metavar="FILE", help="write each frame's record as a JSON line ('-': stdout)")
    parser.add_argument("--link", default="loopback", choices=list(link.PROFILES), help="link profile")
    parser.add_argument("--bandwidth", type=float, help="override the profile's bandwidth, Mbit/s")
    parser.add_argument("--rtt", type=float, help="override the profile's round-trip time, ms")
    parser.add_argument("--jitter", type=float, help="override the profile's jitter (std of one-way delay), ms")
    parser.add_argument(
        "--defence",
        default="none",
        choices=list(defences.DEFENCES),
        help="transform the activation before it leaves the device (see splitleak.core.defences)",
    )
    parser.add_argument(
        "--strength",
        type=float,
        help="the defence's strength: "
        + "; ".join(f"{name}: {cls.strengths.describe()}" for name, cls in defences.DEFENCES.items() if name != "none"),
    )
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the summary and every frame's record here")
    return parser


def main(args: argparse.Namespace) -> int:
    head = Head(args.model_dir, args.split, args.threads)
    try:
        defence = defences.build(args.defence, strength=args.strength, split=head.split)
    except ValueError as e:
        print(f"device: {e}", file=sys.stderr)
        return 2
    profile = link.profile(args.link, bandwidth_mbps=args.bandwidth, rtt_ms=args.rtt, jitter_ms=args.jitter)
    dataset = args.dataset or data.default_dataset()
    indices, images, labels = load_frames(dataset, head.manifest, args.limit, args.seed)
    emit = json_lines(args.records) if args.records else None
    control = None
    if args.control:
        control = Control(head, defence, profile, threads=args.threads, report=emit)
        control.listen(sys.stdin if args.control == "-" else open(args.control))
    with transport.channel(args.cloud) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            check_cloud(stub, head, args.cloud)
            print(
                f"device: {len(indices)} frames of {dataset} through {head.served_name}, defence {defence.name} "
                f"(strength {defence.strength:g}), over {profile.describe()} to {args.cloud}",
                flush=True,
            )
            while True:  # with --loop, the same frames again until stopped
                records = stream(
                    head,
                    stub,
                    indices,
                    images,
                    labels,
                    rate=args.rate,
                    max_rate=args.max_rate,
                    link_profile=profile,
                    defence=defence,
                    control=control,
                    seed=args.seed,
                    on_record=None if emit is None else lambda record: emit(record.to_json()),
                )
                if not args.loop:
                    break
        except DeviceError as e:
            print(f"device: {e}", file=sys.stderr)
            return 1
    summary = metrics.summarize(records)
    print(metrics.format_summary(summary), flush=True)
    if args.json:
        config = {
            "cloud": args.cloud,
            "model": head.manifest.name,
            "split": head.split.name,
            "dataset": dataset,
            "link": profile.__dict__,
            "rate": args.rate,
            "defence": {"name": defence.name, "strength": defence.strength},
        }
        frames = [record.to_json() for record in records]
        args.json.write_text(json.dumps({"config": config, "summary": summary, "frames": frames}, indent=1))
    return 0
