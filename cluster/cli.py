"""The ``sendguard`` command line (SPEC §6).

Exit status: 0 done, 1 failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path

from cluster.settings import Settings, load_settings
from cluster.tenants import load_tenants
from cluster.validate import ConfigError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_CONFIG = "/etc/sendguard/sendguard.toml"


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=os.environ.get("SENDGUARD_CONFIG",
                                                                  DEFAULT_CONFIG),
                        help="configuration file (default $SENDGUARD_CONFIG, else %(default)s)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sendguard",
                                     description="Outbound SMTP submission gateway")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="start the gateway")
    _config_arg(run)

    check = commands.add_parser("check-config", help="validate the configuration and exit")
    _config_arg(check)

    demo = commands.add_parser("demo", help="start the gateway on the bundled example")
    demo.add_argument("--dir", default="", help="example folder (default: the bundled one)")

    hash_password = commands.add_parser("hash-password", help="print a password scheme hash")
    hash_password.add_argument("--scheme", default="ARGON2ID",
                               choices=["ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "PLAIN"])
    hash_password.add_argument("password", nargs="?", help="read from stdin when omitted")

    for name, module in _EXTRA_COMMANDS.items():
        import_module(module).add_parser(commands, name, _config_arg)
    return parser


# Commands that live with the parts they drive; each module offers
# add_parser(commands, name, config_arg) and run(args) -> int.
_EXTRA_COMMANDS: dict[str, str] = {
    "status": "cluster.admin",
    "scale": "cluster.admin",
    "tenant": "cluster.support_cli",
    "inspect": "cluster.admin",
    "queue": "cluster.queue_cli",
    "why": "cluster.support_cli",
    "account": "cluster.support_cli",
    "counters": "cluster.support_cli",
    "loadtest": "loadtest.cli",
}


def load_or_exit(path: str) -> Settings:
    try:
        settings = load_settings(path)
        load_tenants(settings.tenants_file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        settings = load_or_exit(args.config)
        from cluster.supervisor import run_cluster

        return run_cluster(settings)
    if args.command == "check-config":
        settings = load_or_exit(args.config)
        print(f"{settings.path}: ok")
        return EXIT_OK
    if args.command == "demo":
        from cluster.demo import prepare_demo

        config = prepare_demo(Path(args.dir) if args.dir else None)
        print(f"sendguard demo: configuration {config}", file=sys.stderr)
        from cluster.supervisor import run_cluster

        return run_cluster(load_or_exit(str(config)))
    if args.command == "hash-password":
        password = args.password if args.password is not None else sys.stdin.readline()
        from cluster.passwords import hash_password

        print(hash_password(password.rstrip("\n"), args.scheme))
        return EXIT_OK
    module = import_module(_EXTRA_COMMANDS[args.command])
    return int(module.run(args))


if __name__ == "__main__":
    sys.exit(main())
