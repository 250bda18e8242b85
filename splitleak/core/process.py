"""Starting and stopping splitleak's own processes (`splitleak cloud`, the proxy, ...) on loopback.

Every launcher (`splitleak run`, the demo, the sweep, the tests) starts a server with `--port 0` and reads the port it
prints on its first line, so that nothing ever races for a fixed port.

What a launcher starts dies with it, even when the launcher is killed with SIGKILL and has no chance to stop it: the
child asks Linux for a signal when its parent dies (prctl PR_SET_PDEATHSIG, see `dies_with_parent`), and every
process started here does so.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path


def dies_with_parent(command: list[str], sig: signal.Signals = signal.SIGTERM) -> list[str]:
    """`command`, to run as a child that Linux sends `sig` when this process dies, however it dies.

    SIGTERM, so that the child stops as it would from `stop`: a cloud drains, a device writes its --json. The child
    starts through splitleak.core.guard, which asks for the signal and then becomes `command`. Linux only (`command`
    unchanged elsewhere). Linux sends it when the *thread* that started the child ends, so start children from a
    thread that lives as long as they should (the main thread, as every launcher here does)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-m", "splitleak.core.guard", str(os.getpid()), str(int(sig)), *command]


def alive(pid: int) -> bool:
    """Whether process `pid` exists (someone else's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's, but there
        pass
    return True


def start_cloud(
    models: list[Path],
    extra: list[str] | None = None,
    timeout_s: float = 60.0,
    *,
    port: int = 0,
    own_session: bool = False,
    stderr=None,
) -> tuple[subprocess.Popen, int]:
    """Start `splitleak cloud --port 0` (or `port`) and wait for the port it prints.

    `port`: a fixed one, for a cloud that comes back where it was (a test of a device that reconnects).
    `own_session`: in a session of its own, so that a Ctrl-C meant for this process does not reach it (stop it).
    `stderr`: where its messages go (a file), as subprocess.Popen takes it; default: this process's stderr."""
    cmd = ["cloud", "--port", str(port), "--models", *map(str, models), *(extra or [])]
    return start_listening(cmd, "cloud", timeout_s, own_session=own_session, stderr=stderr)


def start_listening(
    args: list[str], what: str, timeout_s: float = 60.0, *, own_session: bool = False, stderr=None
) -> tuple[subprocess.Popen, int]:
    """Start `splitleak ARGS...` and wait for the port it prints on its first line ("... listening on HOST:PORT")."""
    proc = subprocess.Popen(
        dies_with_parent([sys.executable, "-m", "splitleak.cli", *args]),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=own_session,
    )
    line = proc.stdout.readline()
    match = re.search(r"listening on \S+:(\d+)", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"the {what} did not start (exit {proc.wait(timeout_s)}): {line!r}")
    return proc, int(match.group(1))


def stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
