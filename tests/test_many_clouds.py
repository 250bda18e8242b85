"""Many clouds behind one `--cloud`, and `splitleak loadtest`: real clouds, devices and load on loopback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from splitleak import cli
from splitleak.core import capture, transport
from splitleak.core.process import dies_with_parent, start_cloud, stop


def test_several_clouds_are_one_round_robin_target_and_one_address_stays_as_it_was():
    assert transport.clouds("127.0.0.1:1,127.0.0.1:2") == (
        "ipv4:127.0.0.1:1,127.0.0.1:2",
        [("grpc.lb_policy_name", "round_robin")],
    )
    assert transport.clouds("localhost:8001") == ("localhost:8001", [("grpc.lb_policy_name", "round_robin")])
    assert transport.clouds("127.0.0.1:8001") == ("127.0.0.1:8001", [])
    with pytest.raises(ValueError, match="IP:PORT, comma-separated"):
        transport.clouds("127.0.0.1:1,cloud.example:2")


def recording_clouds(model_dir, tmp_path, count: int) -> list[tuple[subprocess.Popen, int, object]]:
    clouds = []
    for i in range(count):
        log = open(tmp_path / f"cloud{i}.log", "w")
        proc, port = start_cloud([model_dir], ["--record", str(tmp_path / f"capture{i}")], stderr=log)
        clouds.append((proc, port, log))
    return clouds


def captured(tmp_path, i: int) -> int:
    """What cloud `i` recorded, as it says when it stops."""
    return int(re.search(r"cloud recorded: captured (\d+)", (tmp_path / f"cloud{i}.log").read_text()).group(1))


def live(tmp_path, i: int) -> int:
    """The requests cloud `i` has recorded so far (the capture is flushed at every record)."""
    return len(capture.read(tmp_path / f"capture{i}").records)


@pytest.mark.slow
def test_devices_spread_over_two_clouds_and_survive_one_going_away(shipped_model_dir, tmp_path):
    clouds = recording_clouds(shipped_model_dir, tmp_path, 2)
    target = ",".join(f"127.0.0.1:{port}" for _, port, _ in clouds)
    frames, devices = 300, 3
    try:
        # Many simulated devices first: each stream goes to one cloud, in turn from a random start, so both serve
        # (all 16 on one cloud: one chance in 2**15).
        assert (
            cli.main(["loadtest", "--devices", "16", "--cloud", target, "--duration", "1.5", "--processes", "1"]) == 0
        )
        runs = [
            subprocess.Popen(
                dies_with_parent([sys.executable, "-m", "splitleak.cli", "device", "--cloud", target, "--model-dir",
                 str(shipped_model_dir), "--limit", str(frames), "--max-rate", "60", "--reconnect-s", "20",
                 "--json", str(tmp_path / f"device{i}.json")]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for i in range(devices)
        ]  # fmt: skip
        before = [live(tmp_path, i) for i in range(2)]
        deadline = time.monotonic() + 30
        while sum(grew := [live(tmp_path, i) - before[i] for i in range(2)]) < 20 * devices:
            assert time.monotonic() < deadline, "the devices did not start streaming"
            time.sleep(0.2)
        # a few dozen frames each: then the cloud that serves the most devices goes away mid-run
        gone = grew.index(max(grew))
        stop(clouds[gone][0])
        assert [run.wait(60) for run in runs] == [0] * devices
    finally:
        for proc, _, log in clouds:
            stop(proc)
            log.close()
    assert captured(tmp_path, 0) > 0 and captured(tmp_path, 1) > 0
    reconnects = 0
    for i in range(devices):
        result = json.loads((tmp_path / f"device{i}.json").read_text())
        answered = [f["frame"] for f in result["frames"] if f["error"] is None]
        assert sorted(answered) == sorted({f["frame"] for f in result["frames"]}) and len(answered) == frames
        assert result["summary"]["duplicate_answers"] == 0
        reconnects += result["summary"]["reconnects"]
    assert reconnects >= 1  # at least one device was on the cloud that went away, and went on on the other


def test_a_dns_name_with_a_record_per_cloud_spreads_devices_over_them(shipped_model_dir, tmp_path):
    """`--cloud dns://SERVER/NAME:PORT`: a real DNS server on loopback answers NAME with an A and an AAAA record, a
    cloud listens on each (127.0.0.1 and ::1, one port), and gRPC's round robin sends streams to both."""
    from dnslib.server import DNSLogger, DNSServer
    from dnslib.zoneresolver import ZoneResolver

    zone = "clouds.splitleak.test. 60 IN A 127.0.0.1\nclouds.splitleak.test. 60 IN AAAA ::1\n"
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")
    dns = DNSServer(ZoneResolver(zone), address="127.0.0.1", port=0, logger=quiet)
    dns.start_thread()
    clouds = []
    try:
        for i, host in enumerate(["127.0.0.1", "::1"]):
            log = open(tmp_path / f"cloud{i}.log", "w")
            port = clouds[0][1] if clouds else 0
            proc, port = start_cloud(
                [shipped_model_dir], ["--host", host, "--record", str(tmp_path / f"capture{i}")], port=port, stderr=log
            )
            clouds.append((proc, port, log))
        target = f"dns://127.0.0.1:{dns.server.server_address[1]}/clouds.splitleak.test:{clouds[0][1]}"
        assert cli.main(["loadtest", "--devices", "16", "--cloud", target, "--duration", "1", "--processes", "1"]) == 0
    finally:
        dns.stop()
        for proc, _, log in clouds:
            stop(proc)
            log.close()
    assert captured(tmp_path, 0) > 0 and captured(tmp_path, 1) > 0  # all 16 on one cloud: one chance in 2**15


@pytest.mark.slow
def test_loadtest_reports_each_devices_latency_and_the_frames_a_second(shipped_cloud, tmp_path, capsys):
    out = tmp_path / "load.json"
    args = ["--devices", "2", "--cloud", f"127.0.0.1:{shipped_cloud}", "--duration", "2", "--json", str(out)]
    assert cli.main(["loadtest", *args, "--cluster"]) == 0  # the devices as tasks on a local Dask cluster
    report = json.loads(out.read_text())
    assert report["devices"] == 2 and report["errors"] == 0 and report["served"] == 2
    assert report["frames"] > 20 and report["frames/s"] == pytest.approx(report["frames"] / 2)
    assert len(report["per device"]) == 2
    for device in report["per device"]:
        assert device["frames"] > 10 and 0 < device["p50 ms"] <= device["p99 ms"]
    printed = capsys.readouterr().out
    assert "loadtest: 2 devices" in printed and printed.count("  device ") == 2


def test_loadtest_refuses_a_malformed_list_of_clouds_in_one_line(capsys):
    assert cli.main(["loadtest", "--cloud", "127.0.0.1:1,nowhere", "--duration", "1"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
