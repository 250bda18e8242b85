"""The shipped faces model (splitleak/models/resnet20-att_faces): it loads as it ships, with a decoder for every split
point, and a real capture of it through the attacker's proxy tells the offline attacker who is in the pictures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitleak import cli
from splitleak.attacker import live, proxy
from splitleak.core import manifest, process
from splitleak.demo.server import FACES_MODEL_DIR

SPLIT = "layer1"
FRAMES = 16


def test_the_shipped_faces_model_loads_with_a_decoder_for_every_split_point():
    m = manifest.load(FACES_MODEL_DIR)  # checks the sha256 of every file against the manifest
    assert (m.name, m.input_shape, len(m.classes)) == ("resnet20-att_faces", (1, 64, 64), 40)
    attacks = live.load_attacks(m)  # checks each decoder was trained on the head that ships
    assert sorted(attacks) == ["decoder"] and sorted(attacks["decoder"]) == sorted(m.splits)
    for inverse in attacks["decoder"].values():
        assert inverse.metadata["command"].startswith("splitleak attacker train-decoder --model-dir splitleak/models/")


@pytest.mark.slow
def test_splitleak_attack_on_a_real_capture_of_the_shipped_faces_model_reports_identity_leakage(tmp_path):
    cloud, cloud_port = process.start_cloud([FACES_MODEL_DIR])
    try:
        tap, port = proxy.start_process(f"127.0.0.1:{cloud_port}", tmp_path / "capture", dataset="att_faces")
        try:
            device = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{port}"]
            device += ["--model-dir", str(FACES_MODEL_DIR), "--dataset", "att_faces", "--split", SPLIT]
            subprocess.run([*device, "--limit", str(FRAMES)], check=True, capture_output=True, timeout=120)
        finally:
            assert process.stop(tap) == 0
    finally:
        process.stop(cloud)

    # rMLE (white box) with few steps: at layer1 it is enough to name the people, in seconds.
    attack = ["attack", "--capture", str(tmp_path / "capture"), "--attack", "rmle", "--steps", "100"]
    assert cli.main([*attack, "--model-dir", str(FACES_MODEL_DIR), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / f"resnet20-att_faces.{SPLIT}" / "summary.json").read_text())["summary"]
    assert summary["dataset"] == "att_faces" and summary["frames"] == FRAMES
    assert summary["identity_chance"] == pytest.approx(1 / 40)
    assert summary["identity_baseline"] >= 0.75  # the attacker's gallery names most of the originals themselves
    assert summary["identity_leakage"] >= 0.75, summary  # and the reconstructions leak as much
