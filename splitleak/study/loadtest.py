"""`splitleak loadtest`: many simulated devices streaming real activations to a cloud (or several) at once.

A simulated device is what `splitleak device` is on the wire without its head: a connection of its own, one
ModelStreamInfer stream, one frame in flight (closed loop). It sends a real activation (the model's head run once per
process on real frames, at the split point), waits for the logits, and sends the next. Many devices are coroutines of
one process; the devices are spread over `--processes` local processes, or over the workers of a Dask cluster
(`--cluster [ADDRESS]`, as `splitleak sweep --cluster`) to load a cloud from several machines. Beside them a probe
calls ServerLive every half second. `--cloud` takes several clouds as `splitleak device` does
(splitleak.core.transport.clouds): each device's stream goes to one of them, in turn.

Reports, over all frames and for each device: frames answered, errors, frames/s, p50 and p99 round trip.
bench/cloud_load.py runs the phases of docs/cloud.md with the same devices.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import grpc
import numpy as np

from splitleak.core import codec, data, manifest, transport
from splitleak.core.options import number
from splitleak.device.client import Head, load_frames
from splitleak.protos import inference_pb2 as pb

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


def own_channel(target: str) -> grpc.aio.Channel:
    """A connection of its own (to one of the clouds `target` names), as a separate device would have."""
    target, balancing = transport.clouds(target)
    options = [*transport.OPTIONS, *balancing, ("grpc.use_local_subchannel_pool", 1)]
    return grpc.aio.insecure_channel(target, options=options)


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
    """`devices` devices and the probe, for `seconds`, in this process."""
    until = time.perf_counter() + seconds
    runs = [device(target, requests, until, i * 7) for i in range(devices)]
    *results, slowest_live_ms = await asyncio.gather(*runs, probe(target, until))
    return results, slowest_live_ms


def group(target: str, requests: list[bytes], devices: int, seconds: float, first: int) -> list[Device]:
    """A task: `devices` devices for `seconds`, coroutines of the process that runs it (`first`: the first's number,
    so that groups start at different frames)."""

    async def run() -> list[Device]:
        until = time.perf_counter() + seconds
        return await asyncio.gather(*(device(target, requests, until, (first + i) * 7) for i in range(devices)))

    return asyncio.run(run())


def report(devices: list[Device], seconds: float, slowest_live_ms: float, baseline_p50: float | None = None) -> dict:
    every = np.concatenate([d.latencies_s for d in devices]) * 1e3
    worst = max(devices, key=lambda d: np.median(d.latencies_s) if d.latencies_s else np.inf)
    p50 = float(np.percentile(every, 50)) if len(every) else float("nan")
    return {
        "devices": len(devices),
        "seconds": seconds,
        "frames": len(every),
        "errors": sum(d.errors for d in devices) + sum(d.failure is not None for d in devices),
        "served": sum(bool(d.latencies_s) and d.failure is None and not d.errors for d in devices),
        "frames/s": len(every) / seconds,
        "p50 ms": p50,
        "p99 ms": float(np.percentile(every, 99)) if len(every) else float("nan"),
        "slowest device p50 ms": float(np.percentile(worst.latencies_s or [np.nan], 50)) * 1e3,
        "slowest device p99 ms": float(np.percentile(worst.latencies_s or [np.nan], 99)) * 1e3,
        "p50 / alone": p50 / (baseline_p50 or p50),
        "slowest ServerLive ms": slowest_live_ms,
        "failures": sorted({d.failure for d in devices if d.failure}),
        "per device": [
            {
                "frames": len(d.latencies_s),
                "errors": d.errors,
                "failure": d.failure,
                "p50 ms": float(np.percentile(d.latencies_s, 50)) * 1e3 if d.latencies_s else None,
                "p99 ms": float(np.percentile(d.latencies_s, 99)) * 1e3 if d.latencies_s else None,
            }
            for d in devices
        ],
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", required=True, metavar="HOST:PORT", help="the cloud, or several (IP:PORT,IP:PORT)")
    parser.add_argument("--devices", type=number(int, at_least=1), default=8, help="simulated devices")
    parser.add_argument("--duration", type=number(above=0), default=10.0, help="seconds")
    parser.add_argument("--processes", type=number(int, at_least=1), help="local processes (default: one per core)")
    parser.add_argument(
        "--cluster",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the processes' devices as Dask tasks: alone, a local cluster on 127.0.0.1; with a scheduler's "
        "address, that cluster's workers (one task per worker)",
    )
    parser.add_argument("--model-dir", type=Path, default=manifest.DEFAULT_MODEL_DIR)
    parser.add_argument("--split", default=None, help="default: the model's default split point")
    parser.add_argument("--json", type=Path, help="write the report here")
    return parser


def run(args: argparse.Namespace, requests: list[bytes], submit) -> dict:
    """The devices in groups through `submit` (an executor's), the probe here, for --duration; the report."""
    groups = [len(part) for part in np.array_split(np.arange(args.devices), args.processes) if len(part)]
    firsts = np.cumsum([0, *groups[:-1]])
    futures = [
        submit(group, args.cloud, requests, n, args.duration, int(f)) for n, f in zip(groups, firsts, strict=True)
    ]
    slowest_live_ms = asyncio.run(probe(args.cloud, time.perf_counter() + args.duration))
    devices = [d for future in futures for d in future.result()]
    return report(devices, args.duration, slowest_live_ms)


def main(args: argparse.Namespace) -> int:
    transport.clouds(args.cloud)  # a malformed list fails here, with one line
    requests = real_requests(args.model_dir, args.split, FRAMES)
    if args.cluster is None:
        args.processes = min(args.processes or os.cpu_count() or 1, args.devices)
        # spawn: a forked child would share the gRPC state of this process
        with ProcessPoolExecutor(args.processes, mp_context=get_context("spawn")) as pool:
            result = run(args, requests, pool.submit)
    else:
        from splitleak.study import cluster

        with cluster.client(args.cluster, measures=False) as dask:
            args.processes = min(args.processes or len(dask.scheduler_info()["workers"]), args.devices)
            result = run(args, requests, lambda *a: dask.submit(*a, pure=False))
    print(
        f"loadtest: {result['devices']} devices, {args.duration:g} s against {args.cloud}: {result['frames']} frames "
        f"({result['frames/s']:.0f}/s), {result['errors']} errors, p50 {result['p50 ms']:.1f} ms, "
        f"p99 {result['p99 ms']:.1f} ms, slowest ServerLive {result['slowest ServerLive ms']:.1f} ms"
    )
    for i, d in enumerate(result["per device"]):
        latency = f"p50 {d['p50 ms']:.1f} ms, p99 {d['p99 ms']:.1f} ms" if d["frames"] else "no frame answered"
        failure = f", failed: {d['failure']}" if d["failure"] else ""
        print(f"  device {i}: {d['frames']} frames, {d['errors']} errors, {latency}{failure}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if result["errors"] else 0
