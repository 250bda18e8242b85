"""A bad file or argument ends any subcommand with one clear line and exit 2, never a traceback.

Each case runs the real console script in a process of its own, as a user would, against a copy of the shipped model
folder broken in one way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from splitleak.core import capture, codec, manifest


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    """Model folders broken in the ways a user breaks them: a file truncated, a key missing, not JSON, empty."""
    root = tmp_path_factory.mktemp("broken")
    folders = {}
    for what in ("truncated", "missing-key", "not-json", "missing-file"):
        folder = root / what
        shutil.copytree(manifest.DEFAULT_MODEL_DIR, folder, ignore=shutil.ignore_patterns("attacks"))
        folders[what] = folder
    head = folders["truncated"] / "layer1.head.onnx"
    head.write_bytes(head.read_bytes()[:1000])
    raw = json.loads((folders["missing-key"] / "manifest.json").read_text())
    del raw["input"]
    (folders["missing-key"] / "manifest.json").write_text(json.dumps(raw))
    (folders["not-json"] / "manifest.json").write_text("{not json")
    (folders["missing-file"] / "layer2.tail.onnx").unlink()
    folders["empty"] = root / "empty"
    folders["empty"].mkdir()
    return folders


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitleak.cli", *args], capture_output=True, text=True, timeout=120)


def assert_one_clear_line(done: subprocess.CompletedProcess, *expected: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("truncated", ("layer1.head.onnx does not match the sha256",)),
        ("missing-key", ("is not a manifest splitleak export writes", "'input'")),
        ("not-json", ("is not JSON",)),
        ("missing-file", ("names layer2.tail.onnx, which is not in",)),
        ("empty", ("is not an exported model: no manifest.json",)),
    ],
)
def test_a_broken_model_folder_gets_one_line_from_the_device_and_the_cloud(broken, what, expected):
    assert_one_clear_line(run("device", "--model-dir", str(broken[what]), "--cloud", "127.0.0.1:1"), *expected)
    assert_one_clear_line(run("cloud", "--port", "0", "--models", str(broken[what])), *expected)


def test_an_unknown_split_point_or_data_set_names_what_there_is():
    assert_one_clear_line(
        run("device", "--split", "nosuch", "--cloud", "127.0.0.1:1"), "no split point 'nosuch'", "layer1"
    )
    assert_one_clear_line(run("device", "--dataset", "nosuch", "--cloud", "127.0.0.1:1"), "nosuch")


def test_an_attack_on_a_missing_or_broken_capture_gets_one_line(tmp_path):
    assert_one_clear_line(run("attack", "--capture", str(tmp_path / "nowhere"), "--attack", "decoder"), "nowhere")
    (tmp_path / "cap").mkdir()
    (tmp_path / "cap" / "meta.json").write_text("{broken")
    assert_one_clear_line(run("attack", "--capture", str(tmp_path / "cap"), "--attack", "decoder"), "cap")


def test_an_attack_on_a_model_exported_elsewhere_asks_for_model_dir(tmp_path):
    activation = np.zeros((1, 16, 32, 32), np.float32)
    request = codec.encode_request("mymodel.stem", {"activation": activation}, parameters={"frame_id": 0})
    with capture.CaptureWriter(tmp_path / "cap", tap="proxy", dataset="cifar10", cloud=None) as writer:
        writer.write(request.SerializeToString(), 0)
    done = run("attack", "--capture", str(tmp_path / "cap"), "--attack", "decoder")
    assert_one_clear_line(done, "mymodel", "neither in", "give --model-dir")
