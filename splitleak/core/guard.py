"""`python -m splitleak.core.guard PARENT_PID SIGNAL COMMAND...`: run COMMAND so that Linux sends it SIGNAL when the
process PARENT_PID, which started it, dies, however it dies (splitleak.core.process.dies_with_parent).

It asks for the signal (prctl PR_SET_PDEATHSIG), which outlives the exec that follows, and checks that its parent is
still the one that started it, since a parent that died before the prctl would never send it; then it becomes
COMMAND. A separate small process rather than a `preexec_fn`: that needs a fork() whose at-fork handlers, in a
process where other threads are inside gRPC, now and then abort the child (SIGABRT) before it can exec.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def main(argv: list[str]) -> None:
    parent, sig, command = int(argv[0]), int(argv[1]), argv[2:]
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
