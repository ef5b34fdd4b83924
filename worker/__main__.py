"""``python -m worker --config FILE --name w0``: one worker process.

With ``--runtime-dir`` (how the supervisor starts it) the worker joins the
cluster whose sockets are in that folder and takes its configuration from
the coordinator; without it, it runs alone on the files named by ``--config``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.lifeline import die_with_parent
from cluster.quietstart import stop_signals_end_quietly
from cluster.settings import load_settings
from cluster.validate import ConfigError

EXIT_CONFIG_ERROR = 2


def main() -> int:
    # Until the event loop takes over: a stop while still booting ends the
    # process quietly instead of with a KeyboardInterrupt traceback (the
    # supervisor started us with SIGINT blocked, see cluster/quietstart.py).
    stop_signals_end_quietly()
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", default="w0")
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--runtime-dir", default="",
                        help="join the cluster whose sockets are in this folder")
    args = parser.parse_args()
    if args.parent_pid:
        die_with_parent(args.parent_pid)
    if args.runtime_dir:
        from worker.main import run_cluster_worker

        return run_cluster_worker(Path(args.runtime_dir), args.name)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from worker.main import run_worker

    return run_worker(settings, args.name)


if __name__ == "__main__":
    sys.exit(main())
