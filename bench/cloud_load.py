"""The cloud under load: simulated devices streaming real activations to one `splitleak cloud` at once.

Each device has a connection of its own and a ModelStreamInfer stream, and keeps one frame in flight as
`splitleak device` does (closed loop): it sends a real activation (the shipped ResNet-20's head on a real frame, at
the default split), waits for the logits, and sends the next. The devices are coroutines of one client process;
beside them a probe calls ServerLive every half second.

The phases run one after another against the same cloud: one device alone (the baseline), then 8 devices for 60 s
and 32 devices for 20 s. Each reports frames answered, errors, whether every device was served, frames/s, the p50
and p99 round trip over all frames and for the slowest device, the p50 as a ratio of the lone device's, the slowest
ServerLive, and the cloud's memory (VmRSS) after it.

    nice -n 5 .venv/bin/python bench/cloud_load.py     # docs/cloud.md has the figures and the machine's load
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from splitleak.core import codec, data, manifest, transport
from splitleak.core.process import start_cloud, stop
from splitleak.device.client import Head, load_frames
from splitleak.protos import inference_pb2 as pb

PHASES = [(1, 10.0), (8, 60.0), (32, 20.0)]  # (devices, seconds); the first is the baseline
FRAMES = 64  # distinct real frames, sent round-robin
PROBE_EVERY_S = 0.5
STREAM = f"/{transport.SERVICE_NAME}/ModelStreamInfer"


def real_requests(model_dir: Path, split: str | None, count: int) -> list[bytes]:
    """Serialized requests of `count` real frames through the head, as `splitleak device` sends them."""
    head = Head(model_dir, split)
    _, images, _ = load_frames(data.default_dataset(), head.manifest, count)
    activations = head.run(head.manifest.preprocess(images))
    params = {"split_point": head.split.name, "defence": "none"}
    return [
        codec.encode_request(
            head.served_name, {"activation": a[None]}, request_id=str(i), parameters=params
        ).SerializeToString()
        for i, a in enumerate(activations)
    ]


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak so far (VmHWM), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def own_channel(target: str) -> grpc.aio.Channel:
    """A connection of its own, as a separate device would have."""
    return grpc.aio.insecure_channel(target, options=[*transport.OPTIONS, ("grpc.use_local_subchannel_pool", 1)])


@dataclass
class Device:
    latencies_s: list[float]
    errors: int  # answered in-band with an error
    failure: str | None  # the stream itself failed


async def device(target: str, requests: list[bytes], until: float, offset: int) -> Device:
    latencies, errors = [], 0
    try:
        async with own_channel(target) as channel:
            call = channel.stream_stream(STREAM)()
            i = offset
            while time.perf_counter() < until:
                start = time.perf_counter()
                await call.write(requests[i % len(requests)])
                answer = pb.ModelStreamInferResponse.FromString(await call.read())
                latencies.append(time.perf_counter() - start)
                errors += bool(answer.error_message)
                i += 1
            await call.done_writing()
            code = await call.code()
            return Device(latencies, errors, None if code == grpc.StatusCode.OK else code.name)
    except grpc.RpcError as e:
        return Device(latencies, errors, f"{e.code().name}: {e.details()}")


async def probe(target: str, until: float) -> float:
    """The slowest ServerLive while the devices run, in ms."""
    slowest = 0.0
    async with own_channel(target) as channel:
        live = channel.unary_unary(f"/{transport.SERVICE_NAME}/ServerLive")
        while time.perf_counter() < until:
            start = time.perf_counter()
            await live(pb.ServerLiveRequest().SerializeToString(), timeout=10)
            slowest = max(slowest, time.perf_counter() - start)
            await asyncio.sleep(PROBE_EVERY_S)
    return slowest * 1e3


async def phase(target: str, requests: list[bytes], devices: int, seconds: float) -> tuple[list[Device], float]:
    until = time.perf_counter() + seconds
    runs = [device(target, requests, until, i * 7) for i in range(devices)]
    *results, slowest_live_ms = await asyncio.gather(*runs, probe(target, until))
    return results, slowest_live_ms


def report(devices: list[Device], seconds: float, slowest_live_ms: float, baseline_p50: float | None) -> dict:
    every = np.concatenate([d.latencies_s for d in devices]) * 1e3
    worst = max(devices, key=lambda d: np.median(d.latencies_s) if d.latencies_s else np.inf)
    p50 = float(np.percentile(every, 50))
    return {
        "devices": len(devices),
        "seconds": seconds,
        "frames": len(every),
        "errors": sum(d.errors for d in devices) + sum(d.failure is not None for d in devices),
        "served": sum(bool(d.latencies_s) and d.failure is None and not d.errors for d in devices),
        "frames/s": len(every) / seconds,
        "p50 ms": p50,
        "p99 ms": float(np.percentile(every, 99)),
        "slowest device p50 ms": float(np.percentile(worst.latencies_s, 50)) * 1e3,
        "slowest device p99 ms": float(np.percentile(worst.latencies_s, 99)) * 1e3,
        "p50 / alone": p50 / (baseline_p50 or p50),
        "slowest ServerLive ms": slowest_live_ms,
        "failures": sorted({d.failure for d in devices if d.failure}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=manifest.DEFAULT_MODEL_DIR)
    parser.add_argument("--split", default=None, help="default: the model's default split point")
    args = parser.parse_args()
    requests = real_requests(args.model_dir, args.split, FRAMES)
    proc, port = start_cloud([args.model_dir])
    target = f"127.0.0.1:{port}"
    rows, baseline_p50 = [], None
    try:
        print(f"cloud pid {proc.pid}, before: {memory_mib(proc.pid)}; load average {os.getloadavg()}", flush=True)
        for devices, seconds in PHASES:
            results, slowest_live_ms = asyncio.run(phase(target, requests, devices, seconds))
            row = report(results, seconds, slowest_live_ms, baseline_p50) | {"cloud": memory_mib(proc.pid)}
            baseline_p50 = baseline_p50 or row["p50 ms"]
            rows.append(row)
            print(row, f"load average {os.getloadavg()}", flush=True)
    finally:
        stop(proc)
    print(
        "\n| devices | seconds | frames | errors | served | frames/s | p50 ms | p99 ms | slowest device p50 / p99 ms "
        "| p50 / alone | slowest ServerLive ms | cloud VmRSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['devices']} | {r['seconds']:g} | {r['frames']:,} | {r['errors']} | {r['served']} of {r['devices']} "
            f"| {r['frames/s']:.0f} | {r['p50 ms']:.1f} | {r['p99 ms']:.1f} | {r['slowest device p50 ms']:.1f} / "
            f"{r['slowest device p99 ms']:.1f} | {r['p50 / alone']:.1f} | {r['slowest ServerLive ms']:.1f} "
            f"| {r['cloud']['VmRSS']:.0f} |"
        )


if __name__ == "__main__":
    main()
