"""`splitleak sweep --cluster`: the sweep's runs and attacks as tasks on a real Dask LocalCluster on loopback."""

from __future__ import annotations

import psutil
import pytest

from splitleak.study import cluster, sweep

FAST = {"decoder": {"epochs": 1, "width": 16}}


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


def test_joining_a_cluster_where_no_worker_measures_latency_says_how_to_start_one():
    from distributed import LocalCluster

    with LocalCluster(
        host="127.0.0.1", protocol="tcp://", n_workers=1, processes=False, dashboard_address=None
    ) as bare:
        with pytest.raises(RuntimeError, match="--resources latency=1"):
            with cluster.client(bare.scheduler_address):
                pass
