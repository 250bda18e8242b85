"""The time model against the kernel: per device profile and split, the head's time under a cgroup CPU quota.

For each profile (splitleak.core.compute.PROFILES but the host) and each split of the model, the head runs back to
back for SECONDS inside a cgroup with 1 / slowdown of one core (this process joins it, then leaves it and the group is
removed); "kernel" is the wall time over the runs, divided by their number, against "model", the time model's
prediction (the head's CPU time on this host, times the slowdown). Also per run: the median, and the median of
single runs after an idle moment, which the quota does not slow (it rations CPU per period, at least 1 ms of it).

Needs root and a cgroup hierarchy with the cpu controller; prints why not and exits 1 where there is none.

    nice -n 5 .venv/bin/python bench/compute_check.py
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import onnxruntime as ort

from splitleak.core import compute, manifest

MODEL_DIR = manifest.DEFAULT_MODEL_DIR
PROFILES = ("rpi4", "phone", "armv7")
SECONDS = 2.0  # of back-to-back runs per cell: 40 or more of the longest period (armv7's, 75 ms)
IDLE_RUNS, IDLE_S = 10, 0.1  # single runs, each after this long idle


def main() -> int:
    try:
        compute.cpu_cgroup()
    except compute.QuotaUnavailable as e:
        print(f"compute_check: {e}")
        return 1
    m = manifest.load(MODEL_DIR)
    calibration = compute.calibrate(MODEL_DIR)
    print(f"host: {calibration.host_gmacs:.1f} GMAC/s on {calibration.reference}; load {os.getloadavg()[0]:.1f}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    x = np.zeros((1, *m.input_shape), np.float32)
    print(
        "| profile | slowdown | quota / period µs | split | model ms | kernel ms (mean) | ratio | per-run median ms "
        "| after idle ms | throttled periods |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in PROFILES:
        slowdown = compute.PROFILES[name].slowdown(calibration.host_gmacs)
        for split in m.splits:
            session = ort.InferenceSession(str(m.splits[split].head), options, providers=["CPUExecutionProvider"])
            run = lambda session=session: session.run(["activation"], {"image": x})  # noqa: E731
            for _ in range(20):
                run()
            with compute.CpuQuota(1 / slowdown) as quota:
                per_run, start = [], time.perf_counter()
                while time.perf_counter() - start < SECONDS:
                    t0 = time.perf_counter()
                    run()
                    per_run.append(time.perf_counter() - t0)
                mean_ms = (time.perf_counter() - start) * 1e3 / len(per_run)
                idle = []
                for _ in range(IDLE_RUNS):
                    time.sleep(IDLE_S)
                    t0 = time.perf_counter()
                    run()
                    idle.append(time.perf_counter() - t0)
                stat = quota.throttled()
            model_ms = calibration.predict_ms(split, slowdown)
            print(
                f"| {name} | {slowdown:.1f} | {quota.quota_us} / {quota.period_us} | {split} | {model_ms:.2f} "
                f"| {mean_ms:.2f} | {mean_ms / model_ms:.2f} | {np.median(per_run) * 1e3:.2f} "
                f"| {np.median(idle) * 1e3:.2f} | {stat['throttled']} of {stat['periods']} |",
                flush=True,
            )
    print(f"load at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
