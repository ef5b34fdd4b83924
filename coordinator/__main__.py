"""``python -m coordinator --config FILE --parent-pid N``: the cluster's coordinator.

Exit status: 0 stopped, 2 the configuration, tenant directory or GeoIP
database is bad at start (one line on stderr naming file, key and value),
3 it cannot boot (the metrics or admin HTTP address is taken).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cluster.lifeline import die_with_parent
from cluster.quietstart import stop_signals_end_quietly
from cluster.validate import ConfigError

EXIT_CONFIG_ERROR = 2
EXIT_BOOT_FAILED = 3


def main() -> int:
    # Until the event loop takes over: a stop while still booting ends the
    # process quietly instead of with a KeyboardInterrupt traceback (the
    # supervisor started us with SIGINT blocked, see cluster/quietstart.py).
    stop_signals_end_quietly()
    parser = argparse.ArgumentParser(prog="python -m coordinator")
    parser.add_argument("--config", required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args()
    if args.parent_pid:
        die_with_parent(args.parent_pid)

    from cluster.logjson import setup_logging
    from coordinator.membership import Membership
    from coordinator.service import RECOVERY, SILENCE, Coordinator, read_state
    from coordinator.sources import SnapshotSources
    from coordinator.state_store import StoreError, open_store

    try:
        settings_path = Path(args.config).absolute()
        sources = SnapshotSources(settings_path)
        admin = sources.settings.admin
        users = None
        if admin.listen is not None and admin.users_file is not None:
            from coordinator.http_users import AdminUsers

            users = AdminUsers(settings_path, admin.users_file)
        # Logging first: reading a shared store (Redis) at start may have to say it failed.
        setup_logging(sources.settings.log_file, process="coordinator")
        try:
            store, support = open_store(sources.settings)
        except StoreError as exc:
            raise ConfigError(settings_path, "cluster.state_dir", str(exc),
                              show_value=False) from None
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    runtime_dir = sources.settings.cluster.runtime_dir
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A coordinator restarted within a running cluster continues its numbering.
    state = read_state(runtime_dir)
    sources.start_at((state or {}).get("version", 0) + 1, support)
    membership = Membership(time.monotonic(), first_epoch=(state or {}).get("epoch", 0),
                            silence=SILENCE, recovery=RECOVERY if state is not None else 0.0)
    import uvloop
    import zmq

    try:
        return uvloop.run(Coordinator(sources, runtime_dir, membership, store, users).run())
    except (OSError, zmq.ZMQError) as exc:
        print(f"sendguard: coordinator cannot start: {exc}", file=sys.stderr)
        return EXIT_BOOT_FAILED


if __name__ == "__main__":
    sys.exit(main())
