"""A user adds an attack and a defence without forking: one file each (tests/toys/) with one registry line, named in
SPLITLEAK_ATTACKS and SPLITLEAK_DEFENCES, and every part of splitleak takes them as it takes its own. The toy defence
multiplies the activation by its strength on the device; the toy attack inverts with a weighted mean of the
activation's channels.

Everything runs as a user runs it, in processes of its own given the plugins in their environment: a device streaming
through the real proxy with the toy defence, `splitleak attack` on that capture, `splitleak sweep`, and the demo with
the toy attack exported by `splitleak attacker train-decoder`. This process's own registries never see the toys.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from splitleak.attacker import proxy, scoring
from splitleak.core import capture, defences, manifest
from splitleak.core.plugins import Registry
from splitleak.core.process import stop

TOYS = Path(__file__).resolve().parent / "toys"
FRAMES = 16


@pytest.fixture
def plugins() -> dict[str, str]:
    """This process's environment with the toys named, for the processes a test starts (and theirs after them)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOYS), env.get("PYTHONPATH")]))
    env["SPLITLEAK_ATTACKS"], env["SPLITLEAK_DEFENCES"] = "toy_attack", "toy_defence"
    return env


def splitleak(*args: str, env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "splitleak.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)


def test_a_registry_takes_a_class_only_with_its_declared_contract_and_a_name_of_its_own():
    registry = Registry("defence", defences.Defence, {"strengths": defences.Strengths}, [], variable="UNUSED")

    class Undeclared(defences.Defence):
        name = "undeclared"

        def apply(self, activation, rng):
            return {"activation": activation}, {}

    with pytest.raises(TypeError, match="Undeclared must declare `strengths`"):
        registry.register(Undeclared)
    registry.register(defences.NoDefence)
    impostor = type("Impostor", (defences.NoDefence,), {})
    with pytest.raises(ValueError, match="there is a defence called 'none' already"):
        registry.register(impostor)


def test_the_device_lists_a_plugin_defence_with_its_strengths_and_still_never_imports_torch(plugins):
    # The attack plugin is named too: only the defences' registry is read on the device, so it is never imported.
    script = (
        "import sys; from splitleak.device import client; print(client.get_args_parser().format_help()); "
        "print('torch imported:', 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], env=plugins, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # as argparse wraps it
    assert "toy-scale: the factor the activation is multiplied by, in [0.25, 4]" in text
    assert "torch imported: False" in text
    missing = subprocess.run(
        [sys.executable, "-m", "splitleak.cli", "device", "--help"],
        env=dict(plugins, SPLITLEAK_DEFENCES="no_such_module"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "SPLITLEAK_DEFENCES names 'no_such_module'" in missing.stderr


@pytest.mark.slow
def test_splitleak_attack_inverts_a_capture_of_a_device_running_a_plugin_defence_with_a_plugin_attack(
    cloud, tiny_model_dir, tmp_path, plugins
):
    proc, port = proxy.start_process(f"127.0.0.1:{cloud}", tmp_path / "capture", dataset="cifar10")
    try:
        device = ["device", "--cloud", f"127.0.0.1:{port}", "--dataset", "cifar10", "--model-dir", str(tiny_model_dir)]
        device += ["--split", "stem", "--defence", "toy-scale", "--strength", "2", "--limit", str(FRAMES)]
        streamed = splitleak(*device, env=plugins, timeout_s=120)
        assert streamed.returncode == 0, streamed.stderr
    finally:
        assert stop(proc) == 0

    attack = ["attack", "--capture", str(tmp_path / "capture"), "--model-dir", str(tiny_model_dir)]
    done = splitleak(*attack, "--attack", "toy-mean", "--gamma", "0.8", "--out", str(tmp_path / "out"), env=plugins)

    assert done.returncode == 0, done.stderr
    assert "toy-mean on resnet20-cifar10.stem (The head as a black box, probed" in done.stdout
    summary = json.loads((tmp_path / "out" / "resnet20-cifar10.stem" / "summary.json").read_text())["summary"]
    assert summary["frames"] == FRAMES and summary["knobs"] == {"gamma": 0.8} and summary["auxiliary"] is None
    # A real inversion, if a crude one: the frames' shapes come through, as a flat grey picture's do not (measured on
    # the tiny model: SSIM 0.78 against 0.10 for flat grey). The toy defence does nothing against it, as stretching
    # the brightness to the full range of grey undoes any scale.
    recorded = capture.read(tmp_path / "capture")
    originals = recorded.originals(recorded.activations("resnet20-cifar10.stem")[0], manifest.load(tiny_model_dir))
    flat = scoring.ssim(originals, np.full(originals.shape, 0.5, np.float32)).mean()
    assert summary["ssim_mean"] > flat + 0.04, (summary["ssim_mean"], flat)
    assert "--gamma" in splitleak("attack", "--help", env=plugins).stdout

    refused = splitleak(*attack, "--attack", "rmle", "--defence", "toy-scale", "--strength", "2", env=plugins)
    assert refused.returncode != 0
    assert "rmle cannot model the toy-scale defence: its class declares no `received` form" in refused.stderr


@pytest.mark.slow
def test_splitleak_sweep_runs_a_plugin_attack_against_a_plugin_defence(tiny_model_dir, tmp_path, plugins):
    sweep = ["sweep", "--model-dir", str(tiny_model_dir), "--split", "stem", "--attack", "toy-mean", "--link", "wifi"]
    sweep += ["--dataset", "cifar10", "--frames", "12", "--attack-frames", "6", "--no-plots", "--out", str(tmp_path)]

    done = splitleak(*sweep, "--defence", "toy-scale:2", "--knob", "toy-mean.gamma=0.8", env=plugins, timeout_s=600)

    assert done.returncode == 0, done.stderr
    table = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["defence"], r["strength"]) for r in table] == [("none", 0.0), ("toy-scale", 2.0)]
    for row in table:
        assert row["frames"] == 12 and 0 <= row["accuracy"] <= 1
        assert 0 < row["toy-mean_ssim"] <= 1 and row["max_ssim"] == row["toy-mean_ssim"]
    # A strength outside what the defence declares is refused before anything runs.
    refused = splitleak(*sweep, "--defence", "toy-scale:9", env=plugins)
    assert refused.returncode == 2
    assert "toy-scale takes the factor the activation is multiplied by, in [0.25, 4], not 9.0" in refused.stderr


def get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def post(url: str, change: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(change).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def first_frame(url: str, wanted, timeout_s: float = 90) -> dict:
    """The first frame the page is sent, over /events, for which `wanted(frame)` holds."""
    deadline = time.monotonic() + timeout_s
    with urllib.request.urlopen(url + "events", timeout=timeout_s) as events:
        for line in events:
            if time.monotonic() > deadline:
                break
            if line.startswith(b"data: "):
                frame = json.loads(line[6:])["frame"]
                if frame is not None and wanted(frame):
                    return frame
    pytest.fail(f"no such frame within {timeout_s} s")


@pytest.mark.slow
def test_the_demo_offers_a_plugin_defence_on_its_declared_slider_and_shows_an_exported_plugin_attack(
    tiny_model_dir, tmp_path, plugins
):
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "resnet20-cifar10"))
    export = ["attacker", "train-decoder", "--model-dir", str(model_dir), "--attack", "toy-mean", "--split", "stem"]
    exported = splitleak(*export, "--held-out", "32", "--gamma", "0.8", env=plugins)
    assert exported.returncode == 0, exported.stderr
    assert (model_dir / "attacks" / "stem.toy-mean.onnx").exists()

    start = ["--models", str(model_dir), "--dataset", "embedded", "--split", "stem", "--defence", "toy-scale"]
    command = [sys.executable, "-m", "splitleak.cli", "demo", "--port", "0", *start, "--strength", "2"]
    demo = subprocess.Popen(command, env=plugins, stdout=subprocess.PIPE, text=True)
    try:
        url = next(m.group(0) for line in demo.stdout if (m := re.search(r"http://[\d.]+:\d+/", line)))
        config = get(url + "config")
        assert config["defences"]["toy-scale"] == {
            "means": "the factor the activation is multiplied by, in [0.25, 4]",
            "default": None,
            "slider": {"low": 0.5, "high": 4, "step": 0.5, "start": 2},
        }
        assert config["defences"]["quantise"]["slider"] == {"low": 1, "high": 8, "step": 1, "start": 8}
        assert list(config["attacks"]) == ["toy-mean"] and "stem" in config["attacks"]["toy-mean"]["held_out"]
        first = first_frame(url, lambda f: f["defence"] == "toy-scale" and "toy-mean" in f["attacks"])
        assert first["strength"] == 2

        assert post(url + "control", {"defence": "toy-scale", "strength": 3.5}) == (200, {"ok": True})
        frame = first_frame(url, lambda f: f["strength"] == 3.5 and "toy-mean" in f["attacks"])
        assert frame["defence"] == "toy-scale" and -1 <= frame["attacks"]["toy-mean"]["ssim"] <= 1
        assert get(url + "status")["notice"] is None  # the device took the change
        code, answer = post(url + "control", {"defence": "toy-scale", "strength": 9})
        assert code == 400 and "in [0.25, 4], not 9" in answer["error"]
        # Changes of the wrong type get 400 and a reason, and leave the device running (each was a 500, the last
        # one, a strength that JSON reads as infinite, killed the device for good).
        for body in ('{"split": ["layer1"]}', '{"split": {}}', '{"defence": {}}', '{"attacks": 5}', '{"attacks": null}',
                     '{"attacks": "decoder"}', '{"strength": Infinity}', '{"strength": 1e400}'):  # fmt: skip
            request = urllib.request.Request(url + "control", body.encode(), {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 400 and json.loads(refused.value.read())["error"], body
        assert post(url + "control", {"strength": 1.5}) == (200, {"ok": True})
        assert first_frame(url, lambda f: f["strength"] == 1.5)["defence"] == "toy-scale"
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0
