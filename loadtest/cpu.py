"""CPU time of a server under test: every process of its tree, read from /proc.

A benchmark on a shared machine cannot trust messages per second (the
neighbours' load moves it), but the CPU a server spent per accepted message
moves much less. ``tree_cpu(root)`` is the user + system time of ``root``
and of every live descendant, plus what their children that already exited
used (``cutime``/``cstime`` of the parent that reaped them), so short-lived
helpers (Postfix's smtpd and cleanup, a restarted worker) are counted too.
Take it before and after a measurement and divide the difference by the
messages accepted.
"""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 onwards)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    return data.rsplit(b")", 1)[1].decode("ascii").split()


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(int(name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu(root: int) -> float:
    """Seconds of CPU used so far by ``root``'s process tree (see the module docstring)."""
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat(pid)
        if fields is None:
            continue
        # utime, stime, cutime, cstime are fields 14-17 of the stat line.
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / _TICKS


def trees_cpu(roots: list[int]) -> float:
    return sum(tree_cpu(root) for root in roots)
