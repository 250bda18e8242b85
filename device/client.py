"""The device (`splitleak device`): runs the head with ONNX Runtime and streams activations to the cloud.

What a phone has: ONNX Runtime, numpy and gRPC. This module never imports torch (a test holds it to that).

Each frame goes through preprocess -> head -> defence -> encode on the device, then crosses the simulated uplink
(splitleak.core.link), is answered by the cloud over Triton's ModelStreamInfer stream, and crosses the simulated
downlink back (splitleak.device.frames). With `--rate 0` (the default) one frame is in flight at a time, as fast as
the round trip allows; with `--rate R` frames leave at R per second whether or not the answers are back, so a slow
link queues them.

When the cloud goes away mid-run, the device connects again and sends every frame not yet answered, each answered
exactly once, for up to `--reconnect-s` seconds after the break, saying so on stderr (splitleak.device.stream); then it
gives up with one line and exit 1. However it ends (done, failed, or stopped by Ctrl-C or SIGTERM: exit 128 + the
signal's number), `--json` holds the summary and the record of every frame made so far, those never answered marked
`"unanswered": true`, and `outcome` says how the run ended.

The defence (`--defence NAME --strength S`, splitleak.core.defences; `none` by default) transforms the activation before
it leaves the device, and its name and strength travel in every request: the cloud needs neither, but captures show
what was applied, as an adaptive attacker would know it.

Any Open Inference Protocol server can be the cloud (`--stream`, splitleak.device.stream): on a stock server such as
Triton (`splitleak triton serve`), which reports no times, the stage table has "network + cloud" in place of uplink,
cloud and downlink, and a defence that changes the activation's form is refused in one line before the first frame.

Driven from outside (as `splitleak demo` drives it): `--loop` sends the frames again and again, `--max-rate` paces
them like a camera, `--control -` takes split, link and defence changes between frames (splitleak.device.control), and
`--records -` writes each frame's record as a JSON line the moment its answer is back.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

from splitleak.core import compute, data, defences, link, manifest, metrics
from splitleak.core.options import number
from splitleak.core.tls import Tls
from splitleak.device import compute as device_compute
from splitleak.device.control import Control
from splitleak.device.head import Head
from splitleak.device.stream import STREAMS, Cloud, DeviceError, Stream

CONNECT_S = 10.0  # how long the first connection may take: the cloud may still be starting


class Interrupted(KeyboardInterrupt):
    """A signal (SIGTERM, SIGINT) asked the device to stop; args[0] is its number."""


def load_frames(
    dataset: str, m: manifest.Manifest, limit: int, seed: int = 0, frames: str = "test"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame ids, images resized to the model's input, labels) of `limit` frames drawn without replacement from
    `frames`: the test split, the train split, or half of each (splitleak.core.data.draw_frames: the frame ids say
    which split each frame came from)."""
    ids = data.draw_frames(dataset, frames, limit, seed)
    ds = data.frames(dataset, ids)
    channels, size = m.input_shape[0], m.input_shape[1]
    images = data.resize(ds.images, size, channels)
    labels, unmapped = ds.labels_as(m.classes)
    if unmapped and len(unmapped) < len(ds.classes):
        # Some classes match the model's by name (an image folder's sub-folders, say) and some do not: say which.
        unlabelled = f"{dataset}: classes {', '.join(unmapped)} are not {m.name}'s; their frames count as unlabelled"
        warnings.warn(unlabelled, stacklevel=2)
    return ids, images, labels


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
    parser.add_argument(
        "--cloud",
        default="127.0.0.1:8001",
        metavar="HOST:PORT",
        help="the cloud; several as IP:PORT,IP:PORT,... or a DNS name with several records: each stream goes to one, "
        "in turn, and a cloud that goes away is dropped (splitleak.core.transport.clouds)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=manifest.DEFAULT_MODEL_DIR,
        help="an exported model (default: the shipped ResNet-20 on CIFAR-10)",
    )
    parser.add_argument("--split", help="split point (default: the model's default)")
    parser.add_argument("--dataset", default=None, help="default: cifar10 from the data root, else 'embedded'")
    parser.add_argument("--limit", type=number(int, at_least=1), default=200, help="frames to send")
    parser.add_argument(
        "--frames",
        default="test",
        choices=data.FRAMES,
        help="draw the frames from the data set's test split, its train split, or half of each (mix, drawn at random "
        "with --seed): the frame ids say which (splitleak.core.data), so a tap can score membership",
    )
    parser.add_argument(
        "--rate", type=number(at_least=0), default=0.0, help="frames per second; 0: one in flight at a time"
    )
    parser.add_argument(
        "--max-rate", type=number(at_least=0), default=0.0, help="with --rate 0: at most this many frames a second"
    )
    parser.add_argument(
        "--reconnect-s",
        type=number(at_least=0),
        default=30.0,
        help="when the cloud goes away, keep trying to reconnect for this long, then give up; 0: give up at once",
    )
    parser.add_argument(
        "--stream",
        default="auto",
        choices=STREAMS,
        help="triton: Triton's ModelStreamInfer; oip: the ModelStreamInfer that answers bare ModelInferResponses "
        "(MLServer's); off: one ModelInfer a frame (any OIP server); auto: triton for splitleak's cloud and Triton, "
        "oip for MLServer, off for other servers",
    )
    parser.add_argument("--loop", action="store_true", help="send the frames again and again until stopped")
    parser.add_argument(
        "--control",
        metavar="FILE",
        help="take split, link and defence changes as JSON lines from FILE ('-': stdin) between frames; "
        "the device stops when FILE ends",
    )
    parser.add_argument("--records", metavar="FILE", help="write each frame's record as a JSON line ('-': stdout)")
    parser.add_argument("--link", default="loopback", choices=list(link.PROFILES), help="link profile")
    parser.add_argument("--bandwidth", type=number(above=0), help="override the profile's bandwidth, Mbit/s")
    parser.add_argument("--rtt", type=number(at_least=0), help="override the profile's round-trip time, ms")
    parser.add_argument(
        "--jitter", type=number(at_least=0), help="override the profile's jitter (std of one-way delay), ms"
    )
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
    parser.add_argument(
        "--device",
        choices=[name for name in compute.PROFILES if name != "host"],
        help="run the head as slowly as this class of device (docs/device-profiles.md); default: this host's speed",
    )
    parser.add_argument(
        "--cpu-quota",
        type=number(above=0),
        metavar="FRACTION",
        help="run as a device with this fraction of one of this host's cores (0.2: five times slower)",
    )
    parser.add_argument(
        "--slow-by",
        choices=device_compute.SLOW_BY,
        default="auto",
        help="with --device or --cpu-quota: a cgroup CPU quota (kernel), the time model (model), or the kernel where "
        "it allows it and the model elsewhere (auto)",
    )
    parser.add_argument("--threads", type=number(int, at_least=1), default=1, help="ONNX Runtime threads for the head")
    parser.add_argument("--seed", type=number(int, at_least=0), default=0)
    parser.add_argument(
        "--json", type=Path, help="write the summary and every frame's record here, however the run ends"
    )
    Tls.add_arguments(parser, "device")
    return parser


def main(args: argparse.Namespace) -> int:
    tls = Tls.from_args(args, "device")
    head = Head(args.model_dir, args.split, args.threads)
    try:
        defence = defences.build(args.defence, strength=args.strength, split=head.split)
    except ValueError as e:
        print(f"device: {e}", file=sys.stderr)
        return 2
    if args.device and args.cpu_quota is not None:
        print("device: give --device or --cpu-quota, not both", file=sys.stderr)
        return 2
    if args.cpu_quota is not None and args.cpu_quota > 1:
        print(f"device: --cpu-quota is a fraction of one core, at most 1; got {args.cpu_quota:g}", file=sys.stderr)
        return 2
    profile = link.profile(args.link, bandwidth_mbps=args.bandwidth, rtt_ms=args.rtt, jitter_ms=args.jitter)
    dataset = args.dataset or data.default_dataset()
    indices, images, labels = load_frames(dataset, head.manifest, args.limit, args.seed, args.frames)
    try:
        slow = device_compute.setup(args.model_dir, args.device, args.cpu_quota, args.slow_by)
    except compute.QuotaUnavailable as e:
        print(f"device: --slow-by kernel: {e}", file=sys.stderr)
        return 2
    head.time_model = slow.time_model
    if args.device or args.cpu_quota is not None:
        print(f"device: {slow.describe()}", flush=True)
    emit = json_lines(args.records) if args.records else None
    control = None
    if args.control:
        control = Control(head, defence, profile, threads=args.threads, report=emit, kernel=slow.by == "kernel")
        control.listen(sys.stdin if args.control == "-" else open(args.control))
    stream: Stream | None = None
    code, why = 0, None
    restore = _stop_on_signals()
    try:
        with Cloud(args.cloud, tls, args.stream) as cloud:
            cloud.connect(head, CONNECT_S)
            if (refusal := cloud.refusal(defence, head)) is not None:
                raise DeviceError(refusal)
            wire = ", mutual TLS" if tls else ""
            print(
                f"device: {len(indices)} frames of {dataset} ({args.frames}) through {head.served_name}, "
                f"defence {defence.name} (strength {defence.strength:g}), over {profile.describe()} "
                f"to {args.cloud}{wire} ({cloud.describe()})",
                flush=True,
            )
            while True:  # with --loop, the same frames again until stopped
                stream = Stream(
                    head,
                    cloud,
                    rate=args.rate,
                    max_rate=args.max_rate,
                    link_profile=profile,
                    defence=defence,
                    control=control,
                    seed=args.seed,
                    reconnect_s=args.reconnect_s,
                    on_record=None if emit is None else lambda record: emit(record.to_json()),
                    say=lambda line: print(f"device: {line}", file=sys.stderr, flush=True),
                )
                stream.run(indices, images, labels)
                if not args.loop:
                    break
    except DeviceError as e:
        code, why = 1, str(e)
    except KeyboardInterrupt as e:
        signum = e.args[0] if isinstance(e, Interrupted) else signal.SIGINT
        code, why = 128 + signum, f"stopped by {signal.Signals(signum).name}"
    finally:
        restore()
        slow.close()
    if why is not None:
        print(f"device: {why}", file=sys.stderr, flush=True)
    records = stream.records() if stream is not None else []
    summary = metrics.summarize(records)
    summary |= (
        {"reconnects": 0, "duplicate_answers": 0}
        if stream is None
        else {
            "reconnects": stream.reconnects,
            "duplicate_answers": stream.duplicates,
        }
    )
    if records:
        print(metrics.format_summary(summary), flush=True)
    if args.json:
        config = {
            "cloud": args.cloud,
            "model": head.manifest.name,
            "split": head.split.name,
            "dataset": dataset,
            "frames": args.frames,
            "link": profile.__dict__,
            "rate": args.rate,
            "defence": {"name": defence.name, "strength": defence.strength},
            "reconnect_s": args.reconnect_s,
            "compute": slow.to_json(),
            "stream": args.stream,
        }
        frames = [record.to_json() for record in records]
        outcome = {"exit": code, "error": why}
        args.json.write_text(
            json.dumps({"config": config, "summary": summary, "frames": frames, "outcome": outcome}, indent=1)
        )
    return code


def _stop_on_signals():
    """SIGTERM and SIGINT stop the device as Ctrl-C does (Interrupted), so that it cleans up and writes --json; a
    second signal is ignored, so as not to cut that short. Returns what puts the old handlers back."""
    stops = (signal.SIGTERM, signal.SIGINT)
    old = {sig: signal.getsignal(sig) for sig in stops}

    def interrupt(signum, frame):
        for sig in stops:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    for sig in stops:
        signal.signal(sig, interrupt)
    return lambda: [signal.signal(sig, handler) for sig, handler in old.items()]
