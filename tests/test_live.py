"""What the live demo is built from, on real processes: a device that takes changes while it runs and reports every
frame, a proxy that feeds its captures to a live consumer, and decoders exported to ONNX for the live attacker."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
from conftest import EXPORTED_SPLITS

from splitleak.attacker import live, proxy
from splitleak.attacker.attacks import build
from splitleak.attacker.attacks.base import query, session
from splitleak.attacker.replay import auxiliary_images
from splitleak.core import capture, codec, data, feed, manifest
from splitleak.core.process import stop
from splitleak.protos import inference_pb2 as pb


def lines_of(stream) -> queue.Queue:
    """The lines a process writes, as they come, on a queue (None when it closes)."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def next_json(lines: queue.Queue, where, timeout_s: float = 60.0) -> dict:
    """The next JSON line for which `where` holds."""
    while True:
        line = lines.get(timeout=timeout_s)
        assert line is not None, "the device stopped"
        if line.startswith("{") and where(event := json.loads(line)):
            return event


@pytest.mark.slow
def test_a_looping_device_takes_split_link_and_defence_changes_between_frames_and_stops_when_its_control_ends(
    cloud, tiny_model_dir
):
    cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{cloud}", "--dataset", "embedded"]
    cmd += ["--model-dir", str(tiny_model_dir), "--limit", "5", "--loop", "--control", "-", "--records", "-"]
    device = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    lines = lines_of(device.stdout)
    is_frame = lambda event: "frame" in event  # noqa: E731
    try:
        first = [next_json(lines, is_frame) for _ in range(12)]  # more than --limit: it loops
        assert {(f["split"], f["link"], f["defence"]) for f in first} == {("layer1", "loopback", "none")}
        assert all(f["error"] is None and 0 <= f["prediction"] < 10 for f in first)

        def change(settings: dict) -> dict:
            device.stdin.write(json.dumps(settings) + "\n")
            device.stdin.flush()
            return next_json(lines, lambda event: "control" in event)

        assert change({"split": "layer3", "link": "wifi"}) == {
            "control": {"split": "layer3", "link": "wifi"},
            "error": None,
        }
        after = next_json(lines, is_frame)
        assert (after["split"], after["link"]) == ("layer3", "wifi")
        assert after["bytes_up"] < first[0]["bytes_up"] / 3  # 64x8x8 floats, not 16x32x32
        assert after["uplink_ms"] > 5  # wifi's 10 ms round trip, half of it each way

        refused = change({"split": "nope"})
        assert "nope" in refused["error"] and "layer3" in refused["error"]
        assert change({"defence": "quantise", "strength": 4})["error"] is None
        quantised = next_json(lines, is_frame)
        assert (quantised["split"], quantised["defence"], quantised["strength"]) == ("layer3", "quantise", 4)
        assert quantised["bytes_up"] < after["bytes_up"] / 6  # 4 bits per element instead of 32
        assert change({"bandwidth": 3})["error"].startswith("expected a JSON object with any of split")

        device.stdin.close()  # the controller has gone: the device stops as if interrupted
        assert device.wait(timeout=90) == 130
    finally:
        device.kill()
        device.wait()


@pytest.mark.slow
def test_the_proxy_feeds_a_live_consumer_exactly_what_it_captures(cloud, tiny_model_dir, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        tap, port = proxy.start_process(f"127.0.0.1:{cloud}", tmp_path / "capture", extra=["--feed", address])
        listener.settimeout(30)
        connection, _ = listener.accept()
    fed: list[tuple[int, bytes]] = []
    reader = threading.Thread(target=lambda: fed.extend(feed.receive(connection)), daemon=True)
    reader.start()
    try:
        cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{port}", "--limit", "20"]
        subprocess.run(cmd + ["--model-dir", str(tiny_model_dir), "--dataset", "embedded"], check=True, timeout=120)
    finally:
        assert stop(tap) == 0  # the proxy sends what is queued, then hangs up
    reader.join(timeout=30)

    kept = capture.read(tmp_path / "capture")
    assert len(fed) == len(kept.records) == 20 and kept.meta["dropped"] == 0
    for (captured_ns, request_bytes), record in zip(fed, kept.records, strict=True):
        request = pb.ModelInferRequest.FromString(request_bytes)
        assert (captured_ns, request.model_name) == (record.captured_ns, record.model_name)
        np.testing.assert_array_equal(codec.decode_request(request)["activation"], record.activation)


def test_the_proxy_refuses_to_start_with_nowhere_to_put_its_captures():
    cmd = [sys.executable, "-m", "splitleak.cli", "attacker", "proxy", "--listen-port", "0", "--cloud", "127.0.0.1:1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--capture DIR, --feed HOST:PORT, or both" in result.stderr


@pytest.mark.slow
def test_an_exported_decoder_inverts_as_the_trained_one_and_says_how_to_make_it_again(attacked_model_dir):
    m = manifest.load(attacked_model_dir)
    attacks = live.load_attacks(m)
    assert set(attacks) == {"decoder"} and set(attacks["decoder"]) == set(EXPORTED_SPLITS)
    inverse = attacks["decoder"]["layer2"]
    meta = inverse.metadata
    assert meta["command"].startswith(
        f"splitleak attacker train-decoder --model-dir {attacked_model_dir} --split layer2"
    )
    assert float(meta["psnr"]) > 14 and 0 < float(meta["ssim"]) <= 1
    assert json.loads(meta["knobs"])["epochs"] == 2
    knobs = json.loads(meta["knobs"])
    trained = build("decoder", manifest=m, split="layer2", auxiliary=auxiliary_images("cifar10", m, 500), **knobs)
    test = data.load("cifar10", "test")
    activations = query(session(m.split("layer2").head), m, test.images[:16])
    reconstructions = inverse.invert(activations)
    assert reconstructions.shape == (16, 32, 32, 3) and reconstructions.dtype == np.float32
    np.testing.assert_allclose(reconstructions, trained.invert(activations), atol=1e-5)


@pytest.mark.slow
def test_an_exported_decoder_for_another_head_is_refused_with_the_command_that_retrains_it(
    attacked_model_dir, tmp_path
):
    m = manifest.load(attacked_model_dir)
    folder = tmp_path / "attacks"
    folder.mkdir()
    model = onnx.load(attacked_model_dir / "attacks" / "layer1.decoder.onnx")
    props = {p.key: p.value for p in model.metadata_props} | {"head_sha256": "0" * 64}
    onnx.helper.set_model_props(model, props)
    onnx.save(model, folder / "layer1.decoder.onnx")
    with pytest.raises(ValueError, match="another layer1 head; train it again: splitleak attacker train-decoder"):
        live.load_attacks(m, folder)


def test_the_live_attacker_and_the_demo_never_import_torch():
    code = "import sys, splitleak.demo.server, splitleak.attacker.live; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
