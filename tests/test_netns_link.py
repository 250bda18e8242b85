"""The link model against the kernel: frames from a device in one network namespace to a cloud in another, over a
veth pair the kernel shapes with tbf at a profile's bandwidth, take as long to go up as splitleak.core.link says.

The device runs with no link model, so only the kernel slows it. Needs Linux, root and iproute2; skipped otherwise.
bench/link_check.py is the full comparison, every profile at several split points.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from splitleak.core import link, manifest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))  # bench/ is scripts, not a package
import netns  # noqa: E402

PROFILE = "4g"  # 5.85 Mbit/s: 45 ms for layer2's 33 kB, well above the few ms a busy machine adds to a frame
SPLIT = "layer2"
FRAMES = 8

pytestmark = pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))


def test_uplink_through_a_kernel_shaped_veth_takes_what_the_link_model_says(tmp_path):
    profile = link.PROFILES[PROFILE]
    out = tmp_path / "frames.json"
    with netns.VethPair() as pair:
        port = pair.start_cloud(manifest.DEFAULT_MODEL_DIR)
        for side in netns.SIDES:
            pair.shape(side, profile.bandwidth_mbps)
        cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"{pair.cloud_ip}:{port}"]
        cmd += ["--split", SPLIT, "--limit", str(FRAMES), "--dataset", "embedded", "--link", "loopback"]
        device = pair.popen("device", [*cmd, "--json", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert device.wait(60) == 0, device.stderr.read()
        shaped = pair.qdisc_stats("device")
    frames = json.loads(out.read_text())["frames"]
    assert all(f["error"] is None for f in frames)
    assert shaped["kind"] == "tbf" and shaped["drops"] == 0 and shaped["bytes"] > FRAMES * frames[0]["bytes_up"]

    bandwidth_only = link.Link(link.LinkProfile(PROFILE, profile.bandwidth_mbps, rtt_ms=0.0))
    predicted_ms = [
        (bandwidth_only.arrival(f["bytes_up"], f["device_send_ns"] / 1e9) - f["device_send_ns"] / 1e9) * 1e3
        for f in frames
    ]
    measured_ms = [f["uplink_ms"] for f in frames]
    ratio = statistics.median(measured_ms) / statistics.median(predicted_ms)
    # The wire carries about 5% more than the message (TCP/IP and Ethernet headers) and tbf lets its one-frame
    # bucket go at once; a loaded machine adds a few ms. A rate in bytes, or no shaping at all, would be far off.
    assert 0.85 < ratio < 1.3, f"median uplink {statistics.median(measured_ms):.1f} ms, model {predicted_ms[0]:.1f} ms"
