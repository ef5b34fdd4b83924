"""Exit status of every sendguard command and process (documented API, SPEC §6).

``0`` done, ``1`` failed, ``2`` bad usage or configuration (one line on
stderr: ``FILE: KEY: what is wrong (got VALUE)``), ``3`` a process could not
boot (a port taken, a bad certificate): it would fail again the same way, so
the supervisor does not respawn it. A command reads its configuration with
:func:`cluster.files.load_or_exit`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BOOT_FAILED = 3
