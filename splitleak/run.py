"""`splitleak run`: the cloud and the device as two real processes on loopback, the device's summary printed.

The same entry points a user starts by hand (`splitleak cloud`, `splitleak device`), so this exercises exactly
what a split deployment runs. `--clouds N` starts N clouds and gives the device all their addresses, over which it
spreads its streams (splitleak.core.transport.clouds). Options other than `--models` and `--clouds` are passed on to
the device.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from splitleak import certs
from splitleak.core import manifest
from splitleak.core.options import number
from splitleak.core.process import dies_with_parent, start_cloud, stop

FORWARDS_OPTIONS = True


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        type=Path,
        default=manifest.DEFAULT_MODEL_DIR,
        help="an exported model folder (default: the shipped ResNet-20 on CIFAR-10)",
    )
    parser.add_argument(
        "--tls",
        type=Path,
        metavar="DIR",
        help="mutual TLS between device and cloud, with the certificates in DIR (made there if it holds none)",
    )
    parser.add_argument(
        "--clouds",
        type=number(int, at_least=1),
        default=1,
        help="start this many clouds; the device spreads its streams over them (round robin)",
    )
    parser.epilog = "Every other option is passed to `splitleak device` (see splitleak device --help)."
    return parser


def main(args: argparse.Namespace) -> int:
    tls = ["--tls", str(certs.ensure(args.tls))] if args.tls else []
    wire = ", mutual TLS" if tls else ""
    clouds = []
    try:
        for _ in range(args.clouds):
            clouds.append(start_cloud([args.models], tls))
            print(f"cloud process {clouds[-1][0].pid} listening on 127.0.0.1:{clouds[-1][1]}{wire}", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "splitleak.cli",
            "device",
            "--cloud",
            ",".join(f"127.0.0.1:{port}" for _, port in clouds),
            "--model-dir",
            str(args.models),
            *tls,
            *args.forward,
        ]
        return subprocess.run(dies_with_parent(cmd)).returncode
    finally:
        for cloud, _ in clouds:
            stop(cloud)
