"""``sendguard loadtest accuracy | bench``: the load scenarios, each on its own loopback cluster.

Neither needs a running cluster (each starts its own), so neither takes
``-c``. Exit status: 0 done (accuracy: every check passed), 1 failed, 2 bad
usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.validate import parse_duration

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _duration(text: str) -> float:
    """Seconds as a number (``15``) or a SPEC duration (``"15s"``, ``"2m"``)."""
    try:
        return float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 15, 15s, 2m)") \
            from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more (got {text!r})")
    return value


def add_parser(commands: Any, name: str,
               config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    # Only argparse here: every sendguard command builds this parser, and the
    # scenarios import what only the load extra installs (Locust, dnslib).
    loadtest = commands.add_parser(name, help="load scenarios on a loopback cluster of their own")
    scenarios = loadtest.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    accuracy = scenarios.add_parser(
        "accuracy", help="prove that no limit admits one message too many, and none is lost")
    accuracy.add_argument("--workers", type=_positive, default=2, help="workers at the start")
    accuracy.add_argument("--users", type=_positive, default=50, help="Locust users")
    accuracy.add_argument("--duration", type=_duration, default=30.0,
                          help="seconds of load (15, 15s, 2m)")
    accuracy.add_argument("--scale-to", type=_positive, default=None, metavar="M",
                          help="change the worker count to M while the load runs")
    accuracy.add_argument("--kill-worker", action="store_true",
                          help="SIGKILL a worker while the load runs")
    accuracy.add_argument("--ip-limit", type=_positive, default=100,
                          help="messages per hour per client address")
    accuracy.add_argument("--until-limits", type=int, default=0, metavar="N",
                          help="after --duration, go on until the N smallest account limits "
                          "were reached (at most --max-duration)")
    accuracy.add_argument("--max-duration", type=_duration, default=0.0,
                          help="longest load with --until-limits (default: --duration)")
    accuracy.add_argument("--settle", type=_duration, default=90.0,
                          help="longest wait for the sink to receive what was acknowledged")
    accuracy.add_argument("--keep", action="store_true", help="keep the run's folder")
    accuracy.add_argument("--json", action="store_true", help="machine-readable output")
    bench = scenarios.add_parser(
        "bench", help="msgs/s and CPU per message of sendguard at 1..N workers, "
        "a stock aiosmtpd server and Postfix")
    bench.add_argument("--workers", type=_positive, default=os.cpu_count() or 2,
                       help="measure sendguard at 1..N workers (default: one per CPU)")
    bench.add_argument("--rounds", type=_positive, default=3, help="repeat every measurement")
    bench.add_argument("--messages", type=_positive, default=2000,
                       help="messages per measurement at 1 message per session (x3 at 100)")
    bench.add_argument("--concurrency", type=_positive, default=20, help="sessions in flight")
    bench.add_argument("--clients", type=_positive, default=2, help="client processes")
    bench.add_argument("--compare", action="append", default=[], metavar="DIR",
                       help="also measure sendguard from this source tree (e.g. an earlier "
                       "commit unpacked with git archive), in the same rounds; repeatable")
    bench.add_argument("--no-bare", action="store_true",
                       help="leave out the bare sink with the gateway's aiosmtpd speedups "
                       "(the stock aiosmtpd baseline always runs)")
    postfix = bench.add_mutually_exclusive_group()
    postfix.add_argument("--install-postfix", action="store_true",
                         help="apt-get install postfix first (it REPLACES any other MTA)")
    postfix.add_argument("--no-postfix", action="store_true", help="leave Postfix out")
    bench.add_argument("--spool-dir", default="/var/tmp",
                       help="where sendguard's spool and Postfix's queue live "
                            "(the filesystem matters)")
    bench.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs"
                                            / "perf"),
                       help="folder for the CSV files and the plot (default: docs/perf)")


def run(args: argparse.Namespace) -> int:
    if args.scenario == "accuracy":
        return _accuracy(args)
    from loadtest import bench

    return bench.run(args)


def _accuracy(args: argparse.Namespace) -> int:
    from loadtest.accuracy import Scenario, format_result, run_scenario

    scenario = Scenario(workers=args.workers, users=args.users, duration=args.duration,
                        scale_to=args.scale_to, kill_worker=args.kill_worker,
                        ip_limit=args.ip_limit, until_limits=args.until_limits,
                        max_duration=args.max_duration, settle=args.settle, keep=args.keep)
    if args.users < 2:
        print("sendguard: loadtest accuracy: --users must be 2 or more "
              "(one per group of keys)", file=sys.stderr)
        return EXIT_USAGE
    result = run_scenario(scenario)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(format_result(scenario, result))
    return EXIT_OK if result["ok"] else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtest.cli accuracy ...``: the same commands without the sendguard CLI."""
    parser = argparse.ArgumentParser(prog="sendguard")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser(commands, "loadtest", lambda _: None)
    return run(parser.parse_args(["loadtest", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
