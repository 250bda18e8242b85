"""`splitleak sweep --cluster [ADDRESS]`: the sweep's runs and attacks as tasks on a Dask distributed cluster.

The `sweep` command's entry point: splitleak.study.sweep's options and `--cluster`, its main without it.

Without an address a local cluster starts on 127.0.0.1 (one single-threaded worker process per core, no dashboard);
with one, the sweep joins that scheduler. The tasks are the sweep's own steps (splitleak.study.sweep): each
configuration's device/cloud run is one task, each attack on what that run's cloud recorded is another. Workers share
nothing but what travels with the tasks: a run hands its attacks the intercepted activations and the original frames,
and the driver alone reads and writes the cache, so only what is missing is submitted and each result is written the
moment it completes.

A run measures latency, so it holds the worker resource `latency`, of which each machine has one (the local cluster
gives it to one worker; on a real cluster start one worker per machine with `--resources latency=1`): two runs never
share a machine's cores. Attacks take no resource and train in parallel on every worker. The adaptive decoder of a
defended configuration goes on training the undefended one of the same split (splitleak.attacker.attacks.decoder), so
its task waits for the undefended configuration's and is handed the weights that task trained: trained once per
(model, split), as in the serial sweep, even where the workers' caches are on different machines.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from splitleak.core import data
from splitleak.study import sweep
from splitleak.study.rows import SweepRow

LATENCY = "latency"  # the worker resource a measured run holds: one per machine
LOCAL = "local"  # `--cluster` given without an address
# glibc's mallopt parameters (malloc.h), and the values the attack tasks set (see keep_freed_memory).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD, MMAP_THRESHOLD = 1 << 30, 32 << 20


@contextmanager
def client(address: str = LOCAL, workers: int | None = None, measures: bool = True) -> Iterator:
    """A Dask client on a local cluster bound to 127.0.0.1 (`address` LOCAL) or on the scheduler at `address`.
    `measures`: the tasks will measure latency, so a worker of a joined cluster must hold the `latency` resource."""
    from distributed import Client, LocalCluster

    if address != LOCAL:
        with Client(address, timeout=10) as joined:
            workers = joined.scheduler_info()["workers"].values()
            if not workers:
                raise RuntimeError(f"the Dask scheduler at {address} has no workers")
            if measures and not any(w.get("resources", {}).get(LATENCY) for w in workers):
                raise RuntimeError(
                    f"no worker of the Dask cluster at {address} measures latency: start one per machine with "
                    f"--resources {LATENCY}=1"
                )
            yield joined
        return
    with (
        LocalCluster(
            host="127.0.0.1",
            n_workers=workers or os.cpu_count() or 1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,  # a worker's routine warnings would break the progress bar
        ) as cluster,
        Client(cluster) as local,
    ):
        # One machine, so one worker measures latency: the others only attack.
        first = sorted(local.scheduler_info()["workers"])[0]
        local.run(_give_latency, workers=[first])
        yield local


async def _give_latency(dask_worker) -> None:
    await dask_worker.set_resources(**{LATENCY: 1})


# The tasks: plain functions of picklable arguments, imported by name on the workers.


def keep_freed_memory() -> None:
    """Let glibc keep the memory a training step frees, for the next step, in this worker process.

    A Dask nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536, to hand memory back to the OS sooner. Setting it
    also turns off glibc's dynamic mmap threshold, so every tensor over 128 KiB that a training step allocates is a
    fresh mmap, paid again in page faults. Measured on one decoder task: 18 s in the kernel that way, 4 s with glibc's
    defaults, for the same 37 s of user time. Set here, not in the cluster's configuration, so that it holds on
    workers started by anyone."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):  # glibc; musl has none and never had the problem
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def measure(config: sweep.Config, settings: sweep.Settings) -> tuple[dict, tuple]:
    """One real device -> cloud run: (what it measured, the intercepted frames its attacks invert)."""
    with tempfile.TemporaryDirectory(prefix="splitleak-sweep-") as tmp:
        records, capture_dir = sweep.run_device(config, settings, Path(tmp))
        return sweep.measurement(records), sweep.intercepted(config, capture_dir, settings.attack_frames)


def attack(
    config: sweep.Config, name: str, settings: sweep.Settings, run: tuple, after: tuple | None
) -> tuple[dict, dict[str, bytes]]:
    """`name`'s scores on `run`'s frames, and the weights it trained (file name -> bytes) for the tasks that go on
    from them. `after`: what the undefended configuration's task returned; its weights go into this worker's cache
    first."""
    keep_freed_memory()
    folder = data.cache_dir() / "attacks"
    folder.mkdir(parents=True, exist_ok=True)
    given = after[1] if after else {}
    for file, content in given.items():
        if not (folder / file).exists():
            (folder / file).write_bytes(content)
    before = set(os.listdir(folder))
    scores = sweep.attack_scores(config, name, run[1], settings)
    made = set(os.listdir(folder)) - before
    return scores, given | {file: (folder / file).read_bytes() for file in made}


def sweep_on(
    dask,
    todo: list[sweep.Config],
    *,
    links: list[str],
    attacks: list[str],
    settings: sweep.Settings,
    devices: tuple[str, ...] = ("host",),
    progress=True,
) -> tuple[list[SweepRow], int]:
    """The table of the configurations `todo` (splitleak.study.sweep.configs), their missing results computed on the
    `dask` client's cluster; (table, tasks submitted)."""
    from distributed import as_completed
    from tqdm import tqdm

    paths = {config: sweep.result_paths(config, settings, attacks) for config in todo}
    pending: dict = {}  # future -> (configuration, attack name, or None for the run)
    submitted: dict[tuple[sweep.Config, str], object] = {}
    for config in todo:
        measured_path, attack_paths = paths[config]
        missing = [a for a, p in attack_paths.items() if not p.exists()]
        if not missing and measured_path.exists():
            continue
        # Runs first: every attack waits for one, and the one worker that measures would otherwise take attacks in
        # submission order and leave the later runs, and their attacks, to the end. Then the undefended
        # configurations' attacks, whose weights the defended ones wait for; then the rest.
        run = dask.submit(measure, config, settings, resources={LATENCY: 1}, priority=2, pure=False)
        pending[run] = (config, None)
        for name in missing:
            after = submitted.get((sweep.Config(config.model_dir, config.split), name))
            first = int(config.defence == "none")
            future = dask.submit(attack, config, name, settings, run, after, priority=first, pure=False)
            submitted[(config, name)] = future
            pending[future] = (config, name)
    with tqdm(total=len(pending), desc="sweep", unit="task", disable=not progress) as bar:
        for future in as_completed(list(pending)):
            config, name = pending[future]
            measured_path, attack_paths = paths[config]
            path = measured_path if name is None else attack_paths[name]
            path.write_text(json.dumps(future.result()[0]))
            bar.set_postfix_str(f"{config.label} {name or 'run'}")
            bar.update()
    results = {config: sweep.read_results(*paths[config]) for config in todo}
    return sweep.table_of(todo[0].model_dir, results, links, settings.seed, devices), len(pending)


def get_args_parser() -> argparse.ArgumentParser:
    parser = sweep.get_args_parser()
    parser.add_argument(
        "--cluster",
        nargs="?",
        const=LOCAL,
        metavar="ADDRESS",
        help="run the configurations and attacks as tasks on Dask: alone, a local cluster on 127.0.0.1 (a worker per "
        "core); with a scheduler's address (tcp://HOST:8786), that cluster",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    if args.cluster is None:
        return sweep.main(args)

    def run(todo: list[sweep.Config], **chosen) -> list[SweepRow]:
        with client(args.cluster) as dask:
            table, submitted = sweep_on(dask, todo, **chosen)
        print(f"sweep: {submitted} tasks on the cluster at {args.cluster}", file=sys.stderr)
        return table

    return sweep.main(args, run)
