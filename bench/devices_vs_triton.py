"""One device and 8 devices streaming to splitleak's cloud (each request alone, and with dynamic batching) and to
Triton, on the same tail and the same real frames, side by side in one run.

Each server is a real process on loopback: `splitleak cloud`, `splitleak cloud --batch-max 8 --batch-delay-ms D` for
each delay in DELAYS_MS, and `tritonserver` serving the same tail (`splitleak triton repo`, .venv-triton; left out
where that venv is missing). The devices are splitleak.study.loadtest's: each a connection of its own and a
ModelStreamInfer stream with one real activation in flight (closed loop), coroutines of this one process. For each
round, every server gets 1 device then 8 devices for SECONDS each, in turn, so that a change in the machine's load
falls on all of them alike; the table gives, per server and device count, the median over ROUNDS rounds of the
frames/s, p50 and p99 round trip, and each one's ratio to the unbatched cloud's.

    nice -n 5 .venv/bin/python bench/devices_vs_triton.py --split layer3    # docs/cloud.md has the figures
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
from pathlib import Path

from splitleak.cloud.triton import Triton
from splitleak.core import manifest
from splitleak.core.process import start_cloud, stop
from splitleak.study.loadtest import FRAMES, phase, real_requests, report

ROOT = Path(__file__).resolve().parents[1]
DEVICES = (1, 8)
SECONDS = 10.0
ROUNDS = 3
DELAYS_MS = (0.0, 1.0)  # --batch-delay-ms of the batching clouds


def servers(stack: contextlib.ExitStack, model_dir: Path, delays_ms) -> dict[str, str]:
    """name -> target of every server, each stopped with `stack`."""
    targets = {}
    for name, extra in [("splitleak", [])] + [
        (f"splitleak batched {d:g} ms", ["--batch-max", "8", "--batch-delay-ms", str(d)]) for d in delays_ms
    ]:
        proc, port = start_cloud([model_dir], extra)
        stack.callback(stop, proc)
        targets[name] = f"127.0.0.1:{port}"
    venv = ROOT / Triton.venv
    if (venv / ".installed").exists():
        repo = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-triton-")))
        names = Triton.write_repo(repo, [model_dir], venv)
        log = stack.enter_context(open(repo / "triton.log", "w"))
        targets["triton"] = f"127.0.0.1:{stack.enter_context(Triton(repo, venv=venv, log=log)).start(names)}"
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=manifest.DEFAULT_MODEL_DIR)
    parser.add_argument("--split", default="layer3")
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--delays-ms", type=float, nargs="*", default=DELAYS_MS)
    args = parser.parse_args()
    requests = real_requests(args.model_dir, args.split, FRAMES)
    rows: dict[tuple[str, int], list[dict]] = {}
    with contextlib.ExitStack() as stack:
        targets = servers(stack, args.model_dir, args.delays_ms)
        for round_ in range(args.rounds):
            for name, target in targets.items():
                for devices in DEVICES:
                    results, _ = asyncio.run(phase(target, requests, devices, args.seconds))
                    row = report(results, args.seconds, 0.0)
                    rows.setdefault((name, devices), []).append(row)
                    print(
                        f"round {round_ + 1} {name} x{devices}: {row['frames/s']:.0f} frames/s, p50 "
                        f"{row['p50 ms']:.2f} ms, p99 {row['p99 ms']:.2f} ms, errors {row['errors']}, "
                        f"load average {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
    print(f"\nsplit {args.split}; medians over {args.rounds} rounds of {args.seconds:g} s; (ratio to splitleak's)")
    print("| server | devices | frames/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for devices in DEVICES:
        base = {
            k: statistics.median(r[k] for r in rows[("splitleak", devices)]) for k in ("frames/s", "p50 ms", "p99 ms")
        }
        for name in targets:
            got = rows[(name, devices)]
            cells = []
            for key in ("frames/s", "p50 ms", "p99 ms"):
                value = statistics.median(r[key] for r in got)
                cells.append(f"{value:.0f}" if key == "frames/s" else f"{value:.2f}")
                if name != "splitleak":
                    cells[-1] += f" ({value / base[key]:.2f})"
            print(f"| {name} | {devices} | {' | '.join(cells)} | {sum(r['errors'] for r in got)} |")


if __name__ == "__main__":
    main()
