"""Children die with their supervisor (Linux parent-death signal)."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signum)
    # The parent may have died before prctl took effect.
    if parent_pid and os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)
