"""The link model against the kernel: splitleak.core.link's latencies beside what a kernel-shaped network measures.

The cloud (`splitleak cloud`) and the device (`splitleak device`) run in two network namespaces joined by a veth pair
(bench/netns.py). For every split point and link profile, two runs of the same frames:

- kernel: the device with no link model (`--link loopback`); tc tbf shapes each end of the veth at the profile's
  bandwidth, so the kernel decides when the bytes arrive;
- model: the veth unshaped; the device holds each message as the link model says (`--link PROFILE`), as it does
  when a user simulates a profile on loopback.

It prints a markdown table of the median uplink, downlink and total latency per frame of each run and the ratio
kernel / model (goal: within 15%). The bandwidth term is checked with the delay off on both sides (`--rtt 0
--jitter 0`); where the kernel has sch_netem the delay term is checked too (netem holds each packet half the
profile's round trip, each way; no jitter), and where it does not, the run says so and skips it. (The README's
table comes from a kernel without sch_netem, so that part has not run there.)

Needs Linux, root and iproute2. Run it niced on a shared machine (it measures time, so a busy machine shows):

    nice -n 5 .venv/bin/python bench/link_check.py                       # every shaped profile, layer1-3
    nice -n 5 .venv/bin/python bench/link_check.py --split stem --link 4g --frames 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import netns

from splitleak.core import link, manifest

PROFILES = [name for name, p in link.PROFILES.items() if p.bandwidth_mbps != float("inf")]  # loopback: nothing to shape
SPLITS = ["layer1", "layer2", "layer3"]  # 64, 32 and 16 KiB activations
FRAMES = 40
STAGES = ("uplink", "downlink", "total")


def run_device(pair: netns.VethPair, port: int, split: str, frames: int, link_args: list[str], args) -> list[dict]:
    """One `splitleak device` run in the device's namespace; its per-frame records."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"{pair.cloud_ip}:{port}"]
        cmd += ["--model-dir", str(args.model_dir), "--split", split, "--limit", str(frames), "--json", str(out)]
        cmd += ["--dataset", args.dataset] if args.dataset else []
        proc = pair.popen("device", [*cmd, *link_args], stdout=subprocess.DEVNULL)
        if proc.wait() != 0:
            raise RuntimeError(f"the device failed (exit {proc.returncode}): {' '.join(cmd + link_args)}")
        records = json.loads(out.read_text())["frames"]
    errors = [r["error"] for r in records if r["error"]]
    if errors:
        raise RuntimeError(f"the cloud answered {len(errors)} frames with an error, e.g. {errors[0]}")
    return records


def medians(records: list[dict]) -> dict[str, float]:
    return {stage: statistics.median(r[f"{stage}_ms"] for r in records) for stage in STAGES}


def check(pair: netns.VethPair, port: int, split: str, profile: link.LinkProfile, *, delay: bool, args) -> dict:
    """The two runs of one split point and profile: their medians, the bytes, and what tbf counted and dropped."""
    rtt_ms = profile.rtt_ms if delay else 0.0
    for side in netns.SIDES:
        pair.shape(side, None)
    model_args = ["--link", profile.name, "--rtt", str(rtt_ms), "--jitter", "0"]
    model = run_device(pair, port, split, args.frames, model_args, args)
    for side in netns.SIDES:  # a fresh qdisc: its counters start at zero
        pair.shape(side, profile.bandwidth_mbps, delay_ms=rtt_ms / 2, burst_bytes=args.burst)
    kernel = run_device(pair, port, split, args.frames, ["--link", "loopback"], args)
    stats = pair.qdisc_stats("device")
    drops = stats.get("drops", 0) + pair.qdisc_stats("cloud").get("drops", 0)
    return {
        "split": split,
        "link": profile.name,
        "rtt_ms": rtt_ms,
        "bytes_up": statistics.median(r["bytes_up"] for r in kernel),
        "bytes_down": statistics.median(r["bytes_down"] for r in kernel),
        # Everything the device's end sent, the connection's setup and the metadata call included.
        "wire_bytes_up": stats.get("bytes", 0) / len(kernel),
        "model": medians(model),
        "kernel": medians(kernel),
        # The frame least delayed by other processes on the machine: delays from scheduling only ever add.
        "fastest_uplink": {"model": min(r["uplink_ms"] for r in model), "kernel": min(r["uplink_ms"] for r in kernel)},
        "drops": drops,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| split | link | bytes up: message / on the wire | bytes down | "
        + " | ".join(f"{stage} ms: model / kernel | ratio" for stage in STAGES)
        + " | uplink ratio, fastest frames |",
        "|---|---|---|---|" + "---|---|" * len(STAGES) + "---|",
    ]
    for row in rows:
        name = row["link"] + (f", RTT {row['rtt_ms']:g} ms" if row["rtt_ms"] else "")
        cells = [
            row["split"],
            name,
            f"{row['bytes_up']:,.0f} / {row['wire_bytes_up']:,.0f}",
            f"{row['bytes_down']:,.0f}",
        ]
        for stage in STAGES:
            model, kernel = row["model"][stage], row["kernel"][stage]
            cells += [f"{model:.2f} / {kernel:.2f}", f"{kernel / model:.2f}"]
        fastest = row["fastest_uplink"]
        cells.append(f"{fastest['kernel'] / fastest['model']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=manifest.DEFAULT_MODEL_DIR)
    parser.add_argument("--split", action="append", help=f"split point, repeatable (default: {', '.join(SPLITS)})")
    parser.add_argument("--link", action="append", choices=PROFILES, help="profile, repeatable (default: all shaped)")
    parser.add_argument("--frames", type=int, default=FRAMES, help="frames per run (one in flight at a time)")
    parser.add_argument("--burst", type=int, default=netns.BURST_BYTES, help="tbf bucket, bytes")
    parser.add_argument("--dataset", help="the device's default when not given")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser


def main(args: argparse.Namespace) -> int:
    why = netns.unavailable()
    if why is not None:
        print(f"link check skipped: {why}")
        return 0
    profiles = [link.PROFILES[name] for name in args.link or PROFILES]
    rows = []
    load_before = os.getloadavg()[0]
    with netns.VethPair() as pair:
        print(f"link check: {pair.describe()}; tbf burst {args.burst} bytes", file=sys.stderr)
        no_netem = pair.supports("netem", "delay", "1ms")
        terms = [False] if no_netem else [False, True]
        if no_netem:
            print(f"delay term skipped: this kernel cannot attach netem ({no_netem}); bandwidth term only", flush=True)
        port = pair.start_cloud(args.model_dir)
        for delay in terms:
            for split in args.split or SPLITS:
                for profile in profiles:
                    row = check(pair, port, split, profile, delay=delay, args=args)
                    rows.append(row)
                    ratios = ", ".join(f"{s} {row['kernel'][s] / row['model'][s]:.2f}" for s in STAGES)
                    print(f"  {split} {profile.name} RTT {row['rtt_ms']:g} ms: kernel/model {ratios}", file=sys.stderr)
    print(table(rows))
    print(
        f"\n{args.frames} frames a run, medians; tbf burst {args.burst} bytes; load average (1 min) "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs"
    )
    if any(row["drops"] for row in rows):
        print(f"tbf dropped packets in {sum(1 for row in rows if row['drops'])} runs (see --json)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except KeyboardInterrupt:
        print("link check interrupted; its processes are stopped and its namespaces deleted", file=sys.stderr)
        sys.exit(130)
