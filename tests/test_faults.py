"""Faults survived, nothing lost: a device whose cloud is killed, drained or gone, a device stopped by a signal, and
launchers whose children die with them.

Real processes on 127.0.0.1, the shipped model and the embedded frames (45 distinct ones), so nothing here needs the
shared data. A cloud that must come back where it was gets a fixed port: one the kernel gave out a moment before.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from splitleak.core import manifest, process
from splitleak.device import client

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))  # bench/ is scripts, not a package
import netns  # noqa: E402

FRAMES = 45  # every frame of the embedded data set, each once
MODELS = [manifest.DEFAULT_MODEL_DIR]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_device(port: int, *args: str) -> subprocess.Popen:
    """`splitleak device` writing each record to its stdout as the answer comes."""
    cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{port}", "--dataset", "embedded"]
    cmd += ["--limit", str(FRAMES), "--records", "-", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_records(device: subprocess.Popen, count: int) -> list[dict]:
    """The next `count` records the device writes (fewer if it ends first)."""
    records = []
    while len(records) < count and (line := device.stdout.readline()):
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def finish(device: subprocess.Popen) -> tuple[list[dict], str]:
    """The records the device writes until it exits, and its stderr."""
    out, err = device.communicate(timeout=300)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "loop"),
    [
        (signal.SIGKILL, ["--max-rate", "15"]),  # killed mid-run, the device's closed loop
        (signal.SIGTERM, ["--rate", "30"]),  # drained mid-run, frames still coming at the open loop's rate
    ],
    ids=["cloud-killed-closed-loop", "cloud-drained-open-loop"],
)
def test_a_device_whose_cloud_goes_away_and_comes_back_on_the_same_port_has_every_frame_answered_once(
    stop, loop, tmp_path
):
    port = free_port()
    cloud, _ = process.start_cloud(MODELS, port=port)
    out = tmp_path / "device.json"
    device = start_device(port, *loop, "--reconnect-s", "120", "--json", str(out))
    try:
        before = read_records(device, 10)
        cloud.send_signal(stop)
        cloud.wait(60)
        cloud, _ = process.start_cloud(MODELS, port=port)
        after, err = finish(device)
    finally:
        device.kill()
        process.stop(cloud)
    assert device.returncode == 0, err  # never SIGABRT (-6)
    assert "Traceback" not in err and "terminate called" not in err
    assert "broke after" in err and "reconnected to" in err
    report = json.loads(out.read_text())
    frames = report["frames"]
    assert len(frames) == FRAMES and len({f["frame"] for f in frames}) == FRAMES
    assert all(f["error"] is None and "prediction" in f and not f.get("unanswered") for f in frames)
    assert sorted(f["frame"] for f in before + after) == sorted(f["frame"] for f in frames)  # --records: each once
    assert report["outcome"] == {"exit": 0, "error": None} and report["summary"]["reconnects"] == 1


@pytest.mark.slow
def test_a_device_whose_cloud_does_not_come_back_gives_up_in_one_line_and_marks_what_was_not_answered(tmp_path):
    cloud, port = process.start_cloud(MODELS)
    out = tmp_path / "device.json"
    device = start_device(port, "--rate", "15", "--reconnect-s", "2", "--json", str(out))
    try:
        before = read_records(device, 5)
        process.stop(cloud)
        after, err = finish(device)
    finally:
        device.kill()
    assert device.returncode == 1, err
    assert (
        err.strip().splitlines()[-1].startswith(f"device: gave up on the cloud at 127.0.0.1:{port}: no answer within")
    )
    report = json.loads(out.read_text())
    answered = [f for f in report["frames"] if not f.get("unanswered")]
    unanswered = [f for f in report["frames"] if f.get("unanswered")]
    assert len(answered) == len(before + after) >= 5 and unanswered
    assert all("prediction" not in f and f["error"] is None for f in unanswered)
    assert report["summary"]["unanswered"] == len(unanswered)
    assert report["outcome"]["exit"] == 1 and report["outcome"]["error"].startswith("gave up on the cloud")


@pytest.mark.slow
def test_a_device_stopped_by_sigterm_mid_run_exits_cleanly_and_writes_its_json(tmp_path):
    cloud, port = process.start_cloud(MODELS)
    out = tmp_path / "device.json"
    device = start_device(port, "--loop", "--max-rate", "20", "--json", str(out))
    try:
        before = read_records(device, 5)
        device.send_signal(signal.SIGTERM)
        after, err = finish(device)
    finally:
        device.kill()
        process.stop(cloud)
    assert device.returncode == 128 + signal.SIGTERM, err  # not -6: no abort on the way out
    assert err.strip().splitlines()[-1] == "device: stopped by SIGTERM"
    report = json.loads(out.read_text())
    assert report["outcome"] == {"exit": 128 + signal.SIGTERM, "error": "stopped by SIGTERM"}
    answered = [f for f in report["frames"] if not f.get("unanswered")]
    assert len(answered) >= 1 and len(report["frames"]) - len(answered) <= 1  # closed loop: one in flight at most
    assert report["summary"]["frames"] == len(report["frames"])
    assert len(before + after) >= 5


def gone(pid: int) -> bool:
    """The process has exited (a zombie that no one has reaped yet counts: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until_gone(pid: int, timeout_s: float = 120) -> bool:
    deadline = time.monotonic() + timeout_s
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return gone(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_started_with_the_death_signal_dies_when_its_parent_is_killed():
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from splitleak.core import process\n"
            "child = subprocess.Popen(process.dies_with_parent(['sleep', '600']))\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    assert not gone(child)
    parent.kill()
    parent.wait()
    assert wait_until_gone(child)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_demo_killed_with_sigkill_takes_its_cloud_proxy_and_device_with_it():
    cmd = [sys.executable, "-m", "splitleak.cli", "demo", "--port", "0", "--dataset", "embedded"]
    demo = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in demo.stdout:
            if match := re.search(r"http://[\d.]+:\d+/", line):
                break
        else:
            pytest.fail(f"the demo did not print its address (exit {demo.wait()})")
        status = json.loads(urllib.request.urlopen(match.group(0) + "status", timeout=60).read())
        pids = {role: p["pid"] for role, p in status["processes"].items()}
        assert set(pids) == {"cloud", "proxy", "device"} and not any(gone(pid) for pid in pids.values())
    finally:
        demo.kill()
        demo.wait()
    assert {role: wait_until_gone(pid) for role, pid in pids.items()} == dict.fromkeys(pids, True)


@pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))
def test_network_namespaces_left_by_a_killed_run_are_deleted_by_the_next():
    bench = Path(__file__).parents[1] / "bench"
    run = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, time\nsys.path.insert(0, {str(bench)!r})\nimport netns\n"
            "pair = netns.VethPair().__enter__()\nprint(' '.join(pair.netns.values()), flush=True)\ntime.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    left = run.stdout.readline().split()
    run.kill()
    run.wait()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert left and all(name in listed for name in left)
    with netns.VethPair():
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(name in listed for name in left)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--limit", "-5", "must be at least 1, got -5"),
        ("--limit", "0", "must be at least 1, got 0"),
        ("--rate", "-5", "must be at least 0, got -5"),
        ("--max-rate", "-1", "must be at least 0, got -1"),
        ("--threads", "0", "must be at least 1, got 0"),
        ("--reconnect-s", "-1", "must be at least 0, got -1"),
        ("--bandwidth", "0", "must be more than 0, got 0"),
        ("--rate", "nan", "expected a finite number, got 'nan'"),
        ("--limit", "2.5", "expected an integer, got '2.5'"),
    ],
)
def test_a_device_option_out_of_range_is_refused_by_argparse_in_one_line(option, value, expected, capsys):
    with pytest.raises(SystemExit) as exit:
        client.get_args_parser().parse_args([option, value])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"argument {option}: {expected}")
