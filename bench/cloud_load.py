"""The cloud under load: simulated devices streaming real activations to one `splitleak cloud` at once.

Each device has a connection of its own and a ModelStreamInfer stream, and keeps one frame in flight as
`splitleak device` does (closed loop): it sends a real activation (the shipped ResNet-20's head on a real frame, at
the default split), waits for the logits, and sends the next. The devices are coroutines of one client process
(splitleak.study.loadtest's, as `splitleak loadtest` runs them); beside them a probe calls ServerLive every half
second.

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
from pathlib import Path

from splitleak.core import manifest
from splitleak.core.process import start_cloud, stop
from splitleak.study.loadtest import FRAMES, phase, real_requests, report

PHASES = [(1, 10.0), (8, 60.0), (32, 20.0)]  # (devices, seconds); the first is the baseline


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak so far (VmHWM), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


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
