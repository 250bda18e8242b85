"""Starting and stopping splitleak's own processes (`splitleak cloud`, the proxy, ...) on loopback.

Every launcher (`splitleak run`, the demo, the sweep, the tests) starts a server with `--port 0` and reads the port it
prints on its first line, so that nothing ever races for a fixed port.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path


def start_cloud(
    models: list[Path],
    extra: list[str] | None = None,
    timeout_s: float = 60.0,
    *,
    own_session: bool = False,
    stderr=None,
) -> tuple[subprocess.Popen, int]:
    """Start `splitleak cloud --port 0` and wait for the port it prints.

    `own_session`: in a session of its own, so that a Ctrl-C meant for this process does not reach it (stop it).
    `stderr`: where its messages go (a file), as subprocess.Popen takes it; default: this process's stderr."""
    cmd = ["cloud", "--port", "0", "--models", *map(str, models), *(extra or [])]
    return start_listening(cmd, "cloud", timeout_s, own_session=own_session, stderr=stderr)


def start_listening(
    args: list[str], what: str, timeout_s: float = 60.0, *, own_session: bool = False, stderr=None
) -> tuple[subprocess.Popen, int]:
    """Start `splitleak ARGS...` and wait for the port it prints on its first line ("... listening on HOST:PORT")."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitleak.cli", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=own_session,
    )
    line = proc.stdout.readline()
    match = re.search(r"listening on [\d.]+:(\d+)", line)
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
