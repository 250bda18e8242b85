"""Device compute profiles: the time model everywhere, the kernel's CPU quota where a cgroup can be made, and what a
slower device does to the recommended split."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from splitleak.core import compute
from splitleak.device.head import Head, TimeModel
from splitleak.study import recommend, sweep
from splitleak.study.rows import AttackScores

# Measured on this project's 2-core machine (bench/compute_check.py, docs/device-profiles.md): each head's CPU ms.
HOST = compute.Calibration(
    "resnet20-cifar10",
    head_ms={"stem": 0.0116, "layer1": 0.160, "layer2": 0.276, "layer3": 0.386},
    macs={"stem": 442368, "layer1": 14598144, "layer2": 27705344, "layer3": 40812544},
    reference="layer3",
)


def device(port: int, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "device.json"
    cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{port}", "--dataset", "embedded"]
    cmd += ["--split", "layer2", "--limit", "6", "--json", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return done, json.loads(out.read_text()) if out.exists() else {}


def kernel_quota_or_skip() -> None:
    try:
        compute.CpuQuota(0.5).close()
    except compute.QuotaUnavailable as e:
        pytest.skip(f"no cgroup CPU quota here: {e}")


def test_the_profiles_are_slower_than_this_host_in_the_order_documented():
    slowdowns = [compute.PROFILES[name].slowdown(HOST.host_gmacs) for name in ("host", "rpi4", "phone", "armv7")]
    assert slowdowns[0] == 1.0
    assert slowdowns == sorted(slowdowns) and slowdowns[-1] > 10


def test_the_head_macs_are_counted_from_the_onnx_graph(shipped_model_dir):
    # ResNet-20's stem: a 3x3 convolution from 3 to 16 channels on 32x32 pixels.
    assert compute.head_macs(shipped_model_dir / "stem.head.onnx") == 3 * 16 * 9 * 32 * 32


def test_the_time_model_holds_each_head_for_its_predicted_time(shipped_model_dir):
    head = Head(shipped_model_dir, "layer2", time_model=TimeModel({"layer2": 2.0}, slowdown=10.0))
    x = np.zeros((1, 3, 32, 32), np.float32)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        head.run(x)
        times.append((time.perf_counter() - start) * 1e3)
    assert 20.0 <= min(times) and np.median(times) < 30.0


def test_a_device_slowed_by_the_time_model_says_so_and_takes_the_predicted_head_time(
    shipped_cloud, shipped_model_dir, tmp_path
):
    done, report = device(shipped_cloud, tmp_path, "--cpu-quota", "0.1", "--slow-by", "model")
    assert done.returncode == 0, done.stderr
    assert "by the time model" in done.stdout
    slow = report["config"]["compute"]
    assert (slow["by"], slow["profile"], slow["slowdown"]) == ("model", "custom", pytest.approx(10.0))
    calibration = compute.calibrate(shipped_model_dir)
    head_ms = [frame["head_ms"] for frame in report["frames"]]
    assert min(head_ms) >= 0.95 * calibration.predict_ms("layer2", 10.0)


def test_bad_compute_options_get_one_line_and_exit_2(shipped_cloud, tmp_path):
    for args in (["--cpu-quota", "1.5"], ["--cpu-quota", "0"], ["--device", "phone", "--cpu-quota", "0.5"]):
        done, _ = device(shipped_cloud, tmp_path, *args)
        assert done.returncode == 2 and "quota" in done.stderr.strip().splitlines()[-1], (args, done.stderr)


def test_a_device_under_the_kernels_quota_is_throttled_and_removes_its_group(shipped_cloud, tmp_path):
    kernel_quota_or_skip()
    root, _ = compute.cpu_cgroup()
    done, report = device(shipped_cloud, tmp_path, "--cpu-quota", "0.05", "--slow-by", "kernel")
    assert done.returncode == 0, done.stderr
    slow = report["config"]["compute"]
    assert slow["by"] == "kernel" and slow["throttled"]["throttled"] > 0
    group = Path(slow["detail"].rpartition(", ")[2].rstrip(")"))
    assert group.parent == root and not group.exists()


def test_a_group_left_by_a_killed_process_is_removed_by_the_next_quota():
    kernel_quota_or_skip()
    root, _ = compute.cpu_cgroup()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = root / f"{compute.GROUP_PREFIX}{gone.pid}"
    stale.mkdir()
    with compute.CpuQuota(0.5) as quota:
        assert stale in quota.removed_stale and not stale.exists()


def test_a_slower_device_moves_the_latency_optimal_split_earlier_but_privacy_holds_it_at_layer3(
    shipped_model_dir, monkeypatch
):
    # Each split's bytes and head time as this host measured them, the decoder's SSIM as the sweep measured it
    # (docs/device-profiles.md). On 5g, armv7's 28 ms head at layer3 costs more than the stem's 4x bigger upload.
    monkeypatch.setattr(compute, "calibrate", lambda model_dir: HOST)
    frames = 5
    bytes_up = {"stem": 65713, "layer1": 65717, "layer2": 32949, "layer3": 16565}
    ssim = {"stem": 0.93, "layer1": 0.88, "layer2": 0.73, "layer3": 0.18}
    table = []
    for split in bytes_up:
        measured = {
            "frame": list(range(frames)),
            "correct": [True] * frames,
            "bytes_up": [bytes_up[split]] * frames,
            "bytes_down": [183] * frames,
            "device_ms": [0.3 + HOST.head_ms[split]] * frames,
            "head_ms": [HOST.head_ms[split]] * frames,
            "cloud_ms": [0.4] * frames,
            "transport_ms": [0.5] * frames,
        }
        result = {"measured": measured, "attacks": {"decoder": AttackScores(0.0, ssim[split], 0.0, 0.0).__dict__}}
        config = sweep.Config(shipped_model_dir, split)
        table += sweep.rows(config, result, ["5g"], measured, devices=("host", "armv7"))

    def best(device: str, max_ssim: float) -> str:
        found = recommend.recommend(table, link_name="5g", device=device, max_ssim=max_ssim, max_drop=1.0)
        return found.best.split

    assert (best("host", 1.0), best("armv7", 1.0)) == ("layer3", "stem")
    assert best("host", 0.3) == best("armv7", 0.3) == "layer3"  # only layer3 keeps the image hidden


def test_a_running_device_takes_a_device_profile_between_frames(shipped_cloud, shipped_model_dir):
    cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{shipped_cloud}"]
    cmd += ["--dataset", "embedded", "--split", "layer2", "--limit", "5", "--loop", "--control", "-", "--records", "-"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    events = (json.loads(line) for line in proc.stdout if line.startswith("{"))

    def change(settings: dict) -> dict:
        proc.stdin.write(json.dumps(settings) + "\n")
        proc.stdin.flush()
        return next(event for event in events if "control" in event)

    try:
        assert change({"device": "nokia"})["error"].startswith("no device profile 'nokia'")
        assert change({"device": "armv7"}) == {"control": {"device": "armv7"}, "error": None}
        after = next(event for event in events if "frame" in event)
        calibration = compute.calibrate(shipped_model_dir)
        slowdown = compute.PROFILES["armv7"].slowdown(calibration.host_gmacs)
        assert after["head_ms"] >= 0.95 * calibration.predict_ms("layer2", slowdown)
    finally:
        proc.stdin.close()
        assert proc.wait(30) == 130
