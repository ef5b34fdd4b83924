"""Files that survive a crash whole: written aside, synced, renamed into place, folder synced.

A reader sees the old content or the new, never a mix; once a call returns,
a power cut does not take the change back (STYLE §8).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, mode: int | None = None,
                     check: Callable[[], None] | None = None) -> None:
    """Temp file (O_EXCL) next to ``path``, write, fsync, rename over ``path``, fsync
    the folder. ``mode``: the new file's permission bits; ``check``: called just before
    the rename, and may raise to leave ``path`` as it was."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temp, mode)
        if check is not None:
            check()
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the names in ``folder`` (a file created, renamed or deleted) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
