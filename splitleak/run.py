"""`splitleak run`: the cloud and the device as two real processes on loopback, the device's summary printed.

The same entry points a user starts by hand (`splitleak cloud`, `splitleak device`), so this exercises exactly
what a split deployment runs. Options other than `--models` are passed on to the device.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from splitleak import certs
from splitleak.core import manifest
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
    parser.epilog = "Every other option is passed to `splitleak device` (see splitleak device --help)."
    return parser


def main(args: argparse.Namespace) -> int:
    tls = ["--tls", str(certs.ensure(args.tls))] if args.tls else []
    cloud, port = start_cloud([args.models], tls)
    print(f"cloud process {cloud.pid} listening on 127.0.0.1:{port}{', mutual TLS' if tls else ''}", flush=True)
    try:
        cmd = [
            sys.executable,
            "-m",
            "splitleak.cli",
            "device",
            "--cloud",
            f"127.0.0.1:{port}",
            "--model-dir",
            str(args.models),
            *tls,
            *args.forward,
        ]
        return subprocess.run(cmd, preexec_fn=dies_with_parent()).returncode
    finally:
        stop(cloud)
