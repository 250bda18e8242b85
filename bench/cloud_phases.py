"""Where one frame's time goes inside the cloud: each phase of a stream request timed in place, on a real server.

The cloud (InferenceService on grpc.aio, as `splitleak cloud` runs it) serves in this process; one device
(`splitleak loadtest --devices 1`, a process of its own, one frame in flight) streams real activations at SPLIT for
SECONDS. Each phase of every request is timed with perf_counter as it runs: picking where to answer it (the wire walk,
`_inline`), parsing and checking it (`prepare`), the tail in ONNX Runtime (`Tail.run`) and the answer (`finish`).
Printed: the median of each in microseconds, their sum, and the device's median round trip, so that what the cloud's
own work costs can be set against what gRPC costs (bench/bench_pipeline.py has the bare floors).

    nice -n 5 .venv/bin/python bench/cloud_phases.py      # docs/cloud.md has the figures
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from splitleak.cloud import server
from splitleak.core import manifest

SPLIT = "layer3"
SECONDS = 10.0


def timed(phase: list[float], work):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return work(*args, **kwargs)
        finally:
            phase.append(time.perf_counter() - start)

    return run


async def main() -> None:
    service = server.InferenceService(server.load_tails([manifest.DEFAULT_MODEL_DIR]))
    phases: dict[str, list[float]] = {"where (wire walk)": [], "prepare": [], "tail": [], "finish": []}
    service._inline = timed(phases["where (wire walk)"], service._inline)
    service.prepare = timed(phases["prepare"], service.prepare)
    service.finish = timed(phases["finish"], service.finish)
    for tail in service.tails.values():
        tail.run = timed(phases["tail"], tail.run)
    grpc_server, port, _ = await server.serve(service)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "splitleak.cli", "loadtest", "--cloud", f"127.0.0.1:{port}", "--devices", "1"]
        cmd += ["--processes", "1", "--split", SPLIT, "--duration", str(SECONDS), "--json", str(report)]
        device = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL)
        await device.wait()
        p50_ms = json.loads(report.read_text())["p50 ms"]
    await grpc_server.stop(None)
    skip = len(phases["prepare"]) // 10  # the first tenth warms up
    medians = {name: float(np.median(times[skip:])) * 1e6 for name, times in phases.items()}
    print(f"split {SPLIT}, {len(phases['prepare'])} frames, load average {os.getloadavg()[0]:.1f}")
    for name, us in medians.items():
        print(f"{name}: {us:.1f} us")
    print(f"sum: {sum(medians.values()):.1f} us; the device's median round trip: {p50_ms * 1e3:.1f} us")


if __name__ == "__main__":
    asyncio.run(main())
