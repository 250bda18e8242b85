"""End to end: `splitleak cloud` and `splitleak device` as real processes give the PyTorch model's predictions."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from splitleak.core import data, manifest
from splitleak.model.checkpoint import load_model, to_tensor


def run_device(port: int, model_dir: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "splitleak.cli",
        "device",
        "--cloud",
        f"127.0.0.1:{port}",
        "--model-dir",
        str(model_dir),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_device_and_cloud_processes_agree_with_the_full_pytorch_model(cloud, tiny_model_dir, tiny_checkpoint, tmp_path):
    out = tmp_path / "frames.json"
    done = run_device(
        cloud, tiny_model_dir, "--dataset", "cifar10", "--limit", "200", "--split", "layer1", "--json", str(out)
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    frames = report["frames"]
    assert len(frames) == 200 and all(f["error"] is None for f in frames)

    test = data.load("cifar10", "test")
    indices = np.array([f["frame"] for f in frames])
    assert len(set(indices)) == 200 and len(set(test.labels[indices])) == 10  # a spread of classes, not one
    with torch.no_grad():
        x = to_tensor(test.images[indices], tiny_checkpoint.mean, tiny_checkpoint.std)
        expected = load_model(tiny_checkpoint)(x).argmax(1).numpy()
    assert [f["prediction"] for f in frames] == expected.tolist()
    assert [f["label"] for f in frames] == test.labels[indices].tolist()
    assert report["summary"]["accuracy"] == np.mean(expected == test.labels[indices])
    assert "accuracy:" in done.stdout and "uplink" in done.stdout and "bytes per frame" in done.stdout


def test_every_stage_is_timed_and_the_link_model_adds_its_delay(shipped_cloud, shipped_model_dir, tmp_path):
    out = tmp_path / "frames.json"
    # 8 Mbit/s is a byte per microsecond: a 64 KiB stem activation takes ~66 ms, plus 20 ms of half round trip.
    done = run_device(
        shipped_cloud,
        shipped_model_dir,
        "--dataset",
        "embedded",
        "--limit",
        "6",
        "--split",
        "stem",
        "--link",
        "wifi",
        "--bandwidth",
        "8",
        "--rtt",
        "40",
        "--jitter",
        "0",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    for frame in json.loads(out.read_text())["frames"]:
        expected_up = frame["bytes_up"] / 1e3 + 20
        assert expected_up <= frame["uplink_ms"] < expected_up + 25
        assert frame["bytes_down"] / 1e3 + 20 <= frame["downlink_ms"] < frame["bytes_down"] / 1e3 + 45
        stages = sum(frame[f"{s}_ms"] for s in ("preprocess", "head", "encode", "uplink", "cloud", "downlink"))
        assert stages <= frame["total_ms"] < stages + 25


def test_the_device_process_never_imports_torch(shipped_cloud, shipped_model_dir, tmp_path):
    # Make `import torch` fail in the device process: a phone has ONNX Runtime, not PyTorch.
    script = tmp_path / "device_without_torch.py"
    script.write_text(
        "import sys\nsys.modules['torch'] = None\nfrom splitleak.cli import main\n"
        f"code = main(['device', '--cloud', '127.0.0.1:{shipped_cloud}', '--model-dir', {str(shipped_model_dir)!r},"
        " '--dataset', 'embedded', '--limit', '10'])\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m] is not None)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "frames: 10 (0 errors)" in done.stdout


def test_the_device_says_clearly_when_the_cloud_is_not_there(shipped_model_dir):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_device(port, shipped_model_dir, "--dataset", "embedded", "--limit", "2")
    assert done.returncode == 1
    assert f"cannot reach the cloud at 127.0.0.1:{port}" in done.stderr


def test_splitleak_run_starts_both_processes_on_the_shipped_model():
    m = manifest.load()  # the shipped default, with its checksums
    assert m.name == "resnet20-cifar10" and m.test_accuracy >= 0.85
    done = subprocess.run(
        [sys.executable, "-m", "splitleak.cli", "run", "--dataset", "embedded", "--limit", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "frames: 20 (0 errors)" in done.stdout and "total" in done.stdout


@pytest.mark.slow
def test_two_devices_stream_to_one_cloud_at_the_same_time(cloud, tiny_model_dir, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "splitleak.cli",
        "device",
        "--cloud",
        f"127.0.0.1:{cloud}",
        "--model-dir",
        str(tiny_model_dir),
        "--dataset",
        "cifar10",
        "--limit",
        "60",
    ]
    outs = [tmp_path / f"device{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen([*cmd, "--split", split, "--json", str(out)], stdout=subprocess.DEVNULL)
        for split, out in zip(("stem", "layer3"), outs, strict=True)
    ]
    assert [p.wait(300) for p in procs] == [0, 0]
    stem, layer3 = ([f["prediction"] for f in json.loads(out.read_text())["frames"]] for out in outs)
    assert stem == layer3  # the same frames (same seed), the same model, split at two points
