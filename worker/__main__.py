"""``python -m worker --config FILE --name w0``: one worker process, started by the supervisor."""

from __future__ import annotations

import argparse
import sys

from cluster.lifeline import die_with_parent
from cluster.settings import load_settings
from cluster.validate import ConfigError

EXIT_CONFIG_ERROR = 2


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", default="w0")
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args()
    if args.parent_pid:
        die_with_parent(args.parent_pid)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from worker.main import run_worker

    return run_worker(settings, args.name)


if __name__ == "__main__":
    sys.exit(main())
