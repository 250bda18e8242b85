"""`splitleak attack` as a user runs it: a real device streams through the real proxy, then a separate process
replays the capture with an attack that needs the labels of its auxiliary images (`shadow`).

Floors sit between what was measured with the knobs below (the tiny ResNet-20 of conftest, split at the stem, the
device's first 16 frames of the sample, two torch threads): 20.8 dB, SSIM 0.74; and the same run with the auxiliary
labels shuffled, which is what replay handing over labels that do not belong to the images gives: 16.5 dB, SSIM 0.58.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitleak.attacker import proxy
from splitleak.core.process import stop

pytestmark = pytest.mark.slow

FRAMES = 16


def test_splitleak_attack_shadow_inverts_a_real_capture_with_the_auxiliary_labels(cloud, tiny_model_dir, tmp_path):
    proc, port = proxy.start_process(f"127.0.0.1:{cloud}", tmp_path / "capture", dataset="cifar10")
    try:
        device = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{port}"]
        device += ["--dataset", "cifar10", "--model-dir", str(tiny_model_dir), "--split", "stem"]
        subprocess.run([*device, "--limit", str(FRAMES)], check=True, capture_output=True, timeout=120)
    finally:
        assert stop(proc) == 0

    attack = [sys.executable, "-m", "splitleak.cli", "attack", "--capture", str(tmp_path / "capture")]
    attack += ["--attack", "shadow", "--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "out")]
    attack += ["--aux-limit", "500", "--epochs", "4", "--steps", "200"]
    done = subprocess.run(attack, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    assert "shadow on resnet20-cifar10.stem" in done.stdout
    summary = json.loads((tmp_path / "out" / "resnet20-cifar10.stem" / "summary.json").read_text())["summary"]
    assert summary["frames"] == FRAMES
    assert summary["auxiliary"] == {"dataset": "cifar10", "images": 500}
    # What ran: the knobs given, and the defaults of the rest.
    assert summary["knobs"] == {"epochs": 4, "batch_size": 64, "lr": 1e-3, "steps": 200, "tv_weight": 0.0, "seed": 0}
    assert summary["psnr_mean"] > 18.5
    assert summary["ssim_mean"] > 0.66
