"""What serving the tails on another engine takes, whichever engine (splitleak.cloud.triton, splitleak.cloud.mlserver):
a venv of the engine's own, a model repository, and the server in a process group of its own on loopback.

Each engine's module gives its requirements, how to write its repository and the command that starts it; this module
creates the venv (`.installed` lists what it was made with, so a change of requirements makes it again), starts the
server on a free port, waits until every model is ready (ModelReady over gRPC, which every OIP server answers), and
stops the whole group (the server and whatever it started: Triton's backend stubs) on SIGTERM, SIGKILL past a margin.
`splitleak ENGINE venv|repo|serve` is the same three actions for each engine.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import grpc

from splitleak.cloud.tail import add_models_argument
from splitleak.core import manifest, transport
from splitleak.core.options import number
from splitleak.core.process import dies_with_parent
from splitleak.protos import inference_pb2 as pb
from splitleak.protos import inference_pb2_grpc as pb_grpc

START_S = 120.0  # loading four models on a busy 2-core machine takes seconds


class EngineError(RuntimeError):
    """The engine cannot be set up or started here: the message says why."""


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def ensure_venv(venv: Path, requirements: tuple[str, ...], say: Callable[[str], None] = lambda line: None) -> None:
    """Create `venv` with `requirements` unless it has them."""
    marker = venv / ".installed"
    wanted = "\n".join(requirements) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        return
    say(f"creating a venv in {venv} ({', '.join(requirements)}): a minute or two")
    for cmd in (
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", *requirements],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = " ".join((done.stderr or done.stdout).strip().splitlines()[-1:])
            raise EngineError(f"could not create the venv in {venv}: {' '.join(cmd[:3])}...: {last}")
    marker.write_text(wanted)


def free_port(host: str) -> int:
    """A port free now, for a server that takes no port 0 (a start that loses it to another is tried again)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server(ABC):
    """An engine's server serving `repo`, in a process group of its own; `stop` ends the group."""

    name: ClassVar[str]  # the engine's name, as `splitleak NAME` and its messages say it
    venv: ClassVar[Path]  # where `make` builds its venv, at the repository's root
    requirements: ClassVar[tuple[str, ...]]
    exit_timeout_s: ClassVar[float]  # how long it takes to stop after SIGTERM

    def __init__(self, repo: Path, *, venv: Path | None = None, host: str = "127.0.0.1", port: int = 0, log=None):
        self.repo, self.host, self.port, self.log = repo, host, port, log
        self.venv_path = venv or self.venv
        self.proc: subprocess.Popen | None = None

    @classmethod
    def write_repo(cls, out: Path, models: list[Path], venv: Path) -> list[str]:
        """Write the model repository for every split of `models` into `out`, one folder per model, named as
        splitleak's cloud names it (`NAME.S`); the names of the models written."""
        names = []
        for root in models:
            m = manifest.load(root)
            for split in m.splits.values():
                name = m.served_name(split.name)
                (out / name).mkdir(parents=True, exist_ok=True)
                cls.write_model(out / name, name, m, split, venv)
                names.append(name)
        return names

    @classmethod
    @abstractmethod
    def write_model(cls, folder: Path, name: str, m: manifest.Manifest, split: manifest.Split, venv: Path) -> None:
        """Write the model `name` (the tail of `split`) into its `folder` of the repository."""

    @abstractmethod
    def command(self, port: int) -> list[str]:
        """The command that serves `self.repo` with gRPC on `self.host`:`port`."""

    def start(self, models: list[str], timeout_s: float = START_S, stopping: list | None = None) -> int:
        """Start the server and wait until every model in `models` is ready; the gRPC port. EngineError if not.
        `stopping`: waiting ends early once it holds something (a signal came)."""
        stopping = [] if stopping is None else stopping
        for _ in range(3):  # a port picked for it may be taken before it binds
            port = self.port or free_port(self.host)
            # A group of its own, so that stopping it stops what it started too; and it dies with this process,
            # however this process dies.
            self.proc = subprocess.Popen(
                dies_with_parent(self.command(port), signal.SIGKILL),
                stdout=self.log or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            if self._wait_ready(port, models, timeout_s, stopping) or stopping:
                self.port = port
                return port
            hung = self.proc.poll() is None  # not a lost port, which ends it at once: trying again would not help
            code = self.stop()
            if self.port or hung:
                break
        why = f"not ready within {timeout_s:g} s" if hung else f"exited with status {code}"
        raise EngineError(f"{self.name} did not serve {', '.join(models)}: {why} (its log says why)")

    def _wait_ready(self, port: int, models: list[str], timeout_s: float, stopping: list) -> bool:
        deadline = time.monotonic() + timeout_s
        with transport.channel(f"{self.host}:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline and self.proc.poll() is None and not stopping:
                try:
                    if all(stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=2).ready for name in models):
                        return True
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        return False

    def stop(self) -> int | None:
        """SIGTERM to the whole group, SIGKILL past its exit timeout and a margin; the server's exit status."""
        if self.proc is None:
            return None
        for sig, wait_s in ((signal.SIGTERM, self.exit_timeout_s + 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.poll()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def get_args_parser(engine: type[Server], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "action",
        choices=["venv", "repo", "serve"],
        help=f"venv: create {engine.name}'s venv; repo: write the model repository; serve: both, and run {engine.name}",
    )
    parser.add_argument("repo", type=Path, nargs="?", help="the model repository (serve: default a temporary folder)")
    add_models_argument(parser)
    parser.add_argument("--venv", type=Path, default=engine.venv, help="its own venv (created by serve if missing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=number(int, at_least=0), default=8001, help="gRPC; 0 picks a free port")
    return parser


def main(engine: type[Server], args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        print(f"{engine.name}: {line}", file=sys.stderr, flush=True)

    if args.action == "repo":
        if args.repo is None:
            raise ValueError(f"give the folder to write the repository into: splitleak {engine.name} repo DIR")
        names = engine.write_repo(args.repo, args.models, args.venv)
        print(f"{engine.name} repository in {args.repo}: {', '.join(names)}")
        return 0
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # from here on, a signal stops the server, whenever it comes
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    try:
        ensure_venv(args.venv, engine.requirements, say)
        if args.action == "venv":
            print(f"{engine.name}: venv ready in {args.venv}")
            return 0
        with tempfile.TemporaryDirectory(prefix=f"splitleak-{engine.name}-") as tmp:
            repo = args.repo or Path(tmp)
            names = engine.write_repo(repo, args.models, args.venv)
            with engine(repo, venv=args.venv, host=args.host, port=args.port, log=sys.stderr) as server:
                port = server.start(names, stopping=stopping)
                if stopping:
                    return 0
                print(f"{engine.name} listening on {args.host}:{port} serving {', '.join(names)}", flush=True)
                while not stopping and server.proc.poll() is None:
                    time.sleep(0.2)
                if not stopping:
                    raise EngineError(f"{engine.name} exited on its own (status {server.proc.returncode})")
    except EngineError as e:
        say(str(e))
        return 1
    return 0
