"""Faults survived, nothing lost: launchers whose children die with them, even when killed with SIGKILL.

Real processes on 127.0.0.1 and the shipped model, so nothing here needs the shared data.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))  # bench/ is scripts, not a package
import netns  # noqa: E402


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
            "child = subprocess.Popen(['sleep', '600'], preexec_fn=process.dies_with_parent())\n"
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
