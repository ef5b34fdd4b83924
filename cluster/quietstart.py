"""Child processes that a stop during their start-up ends quietly.

Python turns SIGINT into KeyboardInterrupt from the first instant of a new
interpreter, so a child stopped while it is still importing (the supervisor
stopping everything because another process could not start) prints a
traceback: several, with several workers, where the operator should see
one line. A signal mask is inherited across fork and exec, so the parent
starts each child with SIGINT blocked; the child's first act is
:func:`stop_signals_end_quietly`, which makes SIGINT end it without a word
until its event loop takes the signal over, and only then unblocks it.
A SIGINT sent in between is held pending, never lost.

Python never handles SIGTERM by itself (its default ends the process
without output), so only SIGINT needs this.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def spawn_quietly(command: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(command)`` with SIGINT blocked in the child from its first instant."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return subprocess.Popen(command, **popen)
    finally:
        # A SIGINT that reached this process meanwhile is delivered now.
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_signals_end_quietly() -> None:
    """In the child, first thing: SIGINT ends the process silently until a loop handles it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
