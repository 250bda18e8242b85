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
them like a camera, `--control -` takes split, link and defence changes between frames (see Control), and
`--records -` writes each frame's record as a JSON line the moment its answer is back.

Stage times: preprocess, head, defence and encode are timed on the device; uplink is from the device handing the request
to the link until the cloud received it, cloud is what the cloud reports, downlink is from the cloud sending the
answer until it arrived. Uplink and downlink compare the device's and the cloud's wall clocks, so they are exact
only when both share a clock (the same machine, as in every run here) or are synchronised.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from splitleak.core import codec, data, defences, link, manifest, metrics, transport
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc


class DeviceError(RuntimeError):
    """The device cannot go on: the message says why, for the user."""


class Head:
    """The first half of the model, as the app ships it: an ONNX file and its manifest."""

    def __init__(
        self, model_dir: str | Path = manifest.DEFAULT_MODEL_DIR, split: str | None = None, threads: int = 1
    ) -> None:
        self.manifest = manifest.load(model_dir)
        self.split = self.manifest.split(split)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.split.head), options, providers=["CPUExecutionProvider"])

    @property
    def served_name(self) -> str:
        return self.manifest.served_name(self.split.name)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Normalised float32 (B, C, H, W) -> activation (B, *activation_shape)."""
        return self.session.run(["activation"], {"image": x})[0]


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


class Control:
    """Settings a running device takes from outside, between frames (`--control`).

    One JSON object a line, with any of `split`, `link` (a profile name), `defence` and `strength`, e.g.
    {"split": "layer2"} or {"defence": "gaussian", "strength": 0.5}. A line is applied whole before the next frame,
    or not at all, and `report` hears which: {"control": the line, "error": null or why}. A strength alone keeps the
    defence; a defence alone takes its default strength. When the lines end (the controller has gone), the device
    stops as if interrupted.
    """

    SETTINGS = ("split", "link", "defence", "strength")

    def __init__(
        self, head: Head, defence: defences.Defence, profile: link.LinkProfile, *, threads: int = 1, report=None
    ) -> None:
        self.head, self.defence, self.profile = head, defence, profile
        self.threads = threads
        self.report = report or (lambda event: None)
        self._heads = {head.split.name: head}  # a split's session is built once, when it is first asked for
        self._lines: queue.Queue[str] = queue.Queue()

    def listen(self, lines) -> None:
        """Take changes from `lines` (such as sys.stdin) on a thread of their own. Call from the main thread."""
        # The end of the lines is delivered as SIGINT; a parent that ignores SIGINT (a demo or test harness that
        # shields itself from Ctrl-C) would pass that on to us, and the device would never stop.
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def read() -> None:
            for line in lines:
                if line.strip():
                    self._lines.put(line)
            # A real SIGINT, not _thread.interrupt_main(): only a signal wakes a main thread blocked in a lock.
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=read, name="device-control", daemon=True).start()

    def apply(self, uplink: link.Link, downlink: link.Link) -> tuple[Head, defences.Defence]:
        """Apply what arrived since the last frame; returns the head and the defence for the next one."""
        while not self._lines.empty():
            line = self._lines.get()
            try:
                change = json.loads(line)
                self._change(change)
            except (ValueError, KeyError, TypeError) as e:
                self.report({"control": line.strip(), "error": e.args[0] if isinstance(e, KeyError) else str(e)})
            else:
                self.report({"control": change, "error": None})
        uplink.profile = downlink.profile = self.profile
        return self.head, self.defence

    def _change(self, change: dict) -> None:
        if not isinstance(change, dict) or not change or set(change) - set(self.SETTINGS):
            raise KeyError(f"expected a JSON object with any of {', '.join(self.SETTINGS)}; got {change!r}")
        head = self.head
        if "split" in change:
            name = str(change["split"])
            head = self._heads.get(name) or Head(self.head.manifest.root, name, self.threads)
        profile = link.profile(change["link"]) if "link" in change else self.profile
        name = change.get("defence", self.defence.name)
        strength = change.get("strength", None if "defence" in change else self.defence.strength)
        defence = defences.build(name, strength=strength, split=head.split)
        self._heads[head.split.name] = head
        self.head, self.profile, self.defence = head, profile, defence


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
    on_record=None,
) -> list[dict]:
    """Stream the frames through the head, the defence (none by default) and the cloud; one record per frame.

    With `rate` 0, `max_rate` caps the frames a second. `control` may switch head, link and defence between frames."""
    defence = defence or defences.build("none", split=head.split)
    rng = np.random.default_rng(seed)  # the defence's randomness, reproducible per run
    uplink, downlink = link.Link(link_profile, seed), link.Link(link_profile, seed + 1)
    records: dict[str, dict] = {}
    outbox: queue.Queue = queue.Queue()
    answered = threading.Semaphore(1)  # closed loop: the next frame waits for the last answer
    failure: list[BaseException] = []

    def produce() -> None:
        nonlocal head, defence
        try:
            start = time.time()
            next_frame = 0.0
            for i, (index, image, label) in enumerate(zip(indices, images, labels, strict=True)):
                if rate > 0:
                    _sleep_until(start + i / rate)
                else:
                    answered.acquire()
                    _sleep_until(next_frame)  # --max-rate: a camera delivers so many frames a second, no more
                    next_frame = time.time() + 1 / max_rate if max_rate > 0 else 0.0
                if control is not None:
                    head, defence = control.apply(uplink, downlink)
                record = {
                    "frame": int(index),
                    "label": int(label),
                    "split": head.split.name,
                    "link": uplink.profile.name,
                    "defence": defence.name,
                    "strength": defence.strength,
                    "start_ns": time.time_ns(),
                    "error": None,
                }
                t0 = time.perf_counter()
                x = head.manifest.preprocess(image[None])
                t1 = time.perf_counter()
                activation = head.run(x)
                t2 = time.perf_counter()
                tensors, form = defence.apply(activation, rng)
                t3 = time.perf_counter()
                request = codec.encode_request(
                    head.served_name,
                    tensors,
                    request_id=str(i),
                    parameters={
                        "split_point": head.split.name,
                        "frame_id": int(index),
                        "defence": defence.name,
                        "defence_strength": defence.strength,
                        **form,
                    },
                )
                send_ns = time.time_ns()
                codec.set_parameters(request.parameters, {"device_send_ns": send_ns})
                t4 = time.perf_counter()
                record.update(
                    preprocess_ms=(t1 - t0) * 1e3,
                    head_ms=(t2 - t1) * 1e3,
                    defence_ms=(t3 - t2) * 1e3,
                    encode_ms=(t4 - t3) * 1e3,
                    bytes_up=request.ByteSize(),
                    device_send_ns=send_ns,
                )
                records[str(i)] = record
                outbox.put((uplink.arrival(record["bytes_up"], send_ns / 1e9), request))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
            failure.append(e)
        finally:
            outbox.put(None)

    def requests():
        while (item := outbox.get()) is not None:
            arrival, request = item
            _sleep_until(arrival)
            yield request

    producer = threading.Thread(target=produce, name="device-producer", daemon=True)
    producer.start()
    done = []
    responses = stub.ModelStreamInfer(requests())
    try:
        for response in responses:
            record = records[response.infer_response.id]
            if response.error_message:
                record["error"] = response.error_message
            else:
                params = codec.get_parameters(response.infer_response.parameters)
                _sleep_until(downlink.arrival(response.ByteSize(), params["cloud_send_ns"] / 1e9))
                end_ns = time.time_ns()
                logits = codec.decode_response(response.infer_response)["logits"]
                record.update(
                    prediction=int(logits[0].argmax()),
                    bytes_down=response.ByteSize(),
                    end_ns=end_ns,
                    uplink_ms=(params["cloud_recv_ns"] - record["device_send_ns"]) / 1e6,
                    cloud_ms=params["cloud_compute_ms"],
                    downlink_ms=(end_ns - params["cloud_send_ns"]) / 1e6,
                    total_ms=(end_ns - record["start_ns"]) / 1e6,
                )
            done.append(record)
            if on_record is not None:
                on_record(record)
            answered.release()
            if len(done) == len(indices):
                break
    except grpc.RpcError as e:
        raise DeviceError(
            f"the cloud ended the stream after {len(done)} of {len(indices)} frames: {e.code().name} {e.details()}"
        ) from e
    finally:
        responses.cancel()
    producer.join(timeout=5)
    if failure:
        raise failure[0]
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
                    on_record=emit,
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
        args.json.write_text(json.dumps({"config": config, "summary": summary, "frames": records}, indent=1))
    return 0
