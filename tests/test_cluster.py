"""`splitleak sweep --cluster`: the sweep's runs and attacks as tasks on a real Dask LocalCluster on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from splitleak.study import cluster, sweep

FAST = {"decoder": {"epochs": 1, "width": 16}}
DASK = str(Path(sys.executable).parent / "dask")  # the command Dask installs beside this Python


@pytest.fixture(scope="module")
def dask():
    with cluster.client(workers=2) as client:
        yield client


def swept(model_dir, **where):
    settings = sweep.Settings("cifar10", frames=16, attack_frames=4, aux_images=100, knobs=FAST)
    chosen = dict(links=["wifi"], attacks=["decoder"], settings=settings, progress=False)
    if "dask" in where:
        todo = list(sweep.configs(model_dir, [], ["layer3"], [("gaussian", 1.0)]))
        return cluster.sweep_on(where["dask"], todo, **chosen)
    return sweep.sweep(model_dir, variants=[], splits=["layer3"], runtime=[("gaussian", 1.0)], **chosen), None


def every_inet_socket() -> list[str]:
    """The local and remote addresses of every TCP socket of this process and its children (the cluster's)."""
    here = psutil.Process()
    addresses = []
    for proc in [here, *here.children(recursive=True)]:
        for conn in proc.net_connections(kind="inet"):
            addresses += [conn.laddr.ip] + ([conn.raddr.ip] if conn.raddr else [])
    return addresses


@pytest.mark.slow
def test_a_sweep_on_a_local_cluster_gives_the_serial_table_and_stays_on_loopback(
    shipped_model_dir, dask, tmp_path, monkeypatch
):
    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path / "serial"))
    serial, _ = swept(shipped_model_dir)
    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path / "cluster"))  # the driver's cache: the workers keep their own
    table, submitted = swept(shipped_model_dir, dask=dask)
    assert submitted == 4  # two runs, an attack on each
    sockets = every_inet_socket()
    assert sockets and set(sockets) == {"127.0.0.1"}
    assert [(r.split, r.defence, r.strength, r.link) for r in table] == [
        (r.split, r.defence, r.strength, r.link) for r in serial
    ]
    for ours, theirs in zip(table, serial, strict=True):
        assert ours.accuracy == theirs.accuracy and ours.bytes_up == theirs.bytes_up
        # The decoder trains from seeded weights on either side; only float sums in another order may differ.
        assert ours.attacks["decoder"].ssim == pytest.approx(theirs.attacks["decoder"].ssim, abs=0.002)
        assert ours.latency_ms["total"].median == pytest.approx(theirs.latency_ms["total"].median, abs=5)
    with cluster.client(dask.scheduler_info()["address"]) as joined:  # the same cluster, joined by its address
        again, submitted = swept(shipped_model_dir, dask=joined)
    assert submitted == 0 and again == table  # all from the driver's cache


@pytest.fixture
def dask_cluster_by_hand(tmp_path):
    """A scheduler and a worker started with Dask's own commands, as the README tells a user with a cluster to.
    Their dashboards are bound to loopback by address: with `--no-dashboard` both still listened on 0.0.0.0."""
    scheduler = subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker = None
    try:
        address = None
        for line in scheduler.stderr:  # "Scheduler at:   tcp://127.0.0.1:PORT"
            if "Scheduler at:" in line:
                address = line.split()[-1]
                break
        assert address and address.startswith("tcp://127.0.0.1:"), "the scheduler did not say where it listens"
        worker = subprocess.Popen(
            [DASK, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--resources", "latency=1",
             "--dashboard-address", "127.0.0.1:0", "--local-directory", str(tmp_path / "worker")],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        yield address, [scheduler, worker]
    finally:
        for proc in [worker, scheduler]:
            if proc is not None:
                proc.terminate()
                proc.wait(30)


@pytest.mark.slow
def test_a_sweep_joins_a_cluster_started_with_dasks_own_commands(shipped_model_dir, dask_cluster_by_hand):
    address, processes = dask_cluster_by_hand
    from distributed import Client

    with Client(address, timeout=30) as waiting:
        waiting.wait_for_workers(1, timeout=60)
    with cluster.client(address) as joined:
        table, submitted = swept(shipped_model_dir, dask=joined)
        workers = joined.scheduler_info()["workers"]
    assert submitted == 4 and len(table) == 2
    assert all(0 <= row.attacks["decoder"].ssim <= 1 and row.accuracy is not None for row in table)
    assert [w["host"] for w in workers.values()] == ["127.0.0.1"]
    addresses = []
    for proc in processes:
        for each in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            addresses += [c.laddr.ip for c in each.net_connections(kind="inet")]
    assert addresses and set(addresses) == {"127.0.0.1"}


def test_joining_a_cluster_where_no_worker_measures_latency_says_how_to_start_one():
    from distributed import LocalCluster

    with LocalCluster(
        host="127.0.0.1", protocol="tcp://", n_workers=1, processes=False, dashboard_address=None
    ) as bare:
        with pytest.raises(RuntimeError, match="--resources latency=1"):
            with cluster.client(bare.scheduler_address):
                pass


FAULTS = """
import resource, sys
import numpy as np
from splitleak.study import cluster
if sys.argv[1] == "kept":
    cluster.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    np.ones(1 << 17)  # 1 MiB (numpy asks for huge pages from 4 MiB), allocated and freed as tensors are
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_attack_tasks_keep_freed_memory_on_workers_a_dask_nanny_started():
    # A nanny's workers run with MALLOC_TRIM_THRESHOLD_=65536: every big allocation is a fresh mmap, faulted in anew.
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    faults = {
        how: int(subprocess.run([sys.executable, "-c", FAULTS, how], env=env, capture_output=True, text=True).stdout)
        for how in ("as-started", "kept")
    }
    assert faults["as-started"] > 100 * 256 * 0.9  # 256 pages of 4 KiB, faulted in anew on every round
    assert faults["kept"] < faults["as-started"] / 20
