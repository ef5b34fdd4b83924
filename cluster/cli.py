"""The ``sendguard`` command line (SPEC §6).

Exit status: 0 done, 1 failed, 2 bad usage or configuration. ``-c FILE``
may stand before the command or after it (the later one wins).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path

from cluster.files import OPTIONAL_AT_START, check_files
from cluster.settings import Settings, load_settings
from cluster.tenants import load_tenants
from cluster.validate import ConfigError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_CONFIG = "/etc/sendguard/sendguard.toml"


_CONFIG_HELP = f"configuration file (default $SENDGUARD_CONFIG, else {DEFAULT_CONFIG})"


def _config_arg(parser: argparse.ArgumentParser) -> None:
    """``-c FILE`` and ``--json`` for a command that works on a configuration."""
    # SUPPRESS: a -c given before the command must survive the command's parser.
    parser.add_argument("-c", "--config", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(takes_config=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sendguard",
                                     description="Outbound SMTP submission gateway")
    parser.add_argument("-c", "--config", default=argparse.SUPPRESS, help=_CONFIG_HELP)
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
    hash_password.add_argument("password", nargs="?",
                               help="asked twice on a terminal, else read from stdin, when omitted")

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
    "dkim": "cluster.dkimkeys",
    "loadtest": "loadtest.cli",
}


def load_or_exit(path: str, *, open_files: bool = False, strict: bool = False) -> Settings:
    """The settings, or exit 2 with one line; ``open_files``: every file they name too
    (``strict``: also those the gateway can run without, as check-config does)."""
    try:
        settings = load_settings(path)
        if open_files:
            check_files(settings, skip=() if strict else OPTIONAL_AT_START)
        else:
            load_tenants(settings.tenants_file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "takes_config", False):
        if not hasattr(args, "config"):
            args.config = os.environ.get("SENDGUARD_CONFIG", DEFAULT_CONFIG)
    elif hasattr(args, "config"):
        parser.error(f"{args.command} takes no -c")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "run":
        # Every file is opened before any process starts: a bad one is one line, not
        # a cluster that starts and stops.
        settings = load_or_exit(args.config, open_files=True)
        from cluster.supervisor import run_cluster

        return run_cluster(settings)
    if args.command == "check-config":
        settings = load_or_exit(args.config, open_files=True, strict=True)
        print(f"{settings.path}: ok")
        return EXIT_OK
    if args.command == "demo":
        from cluster.demo import run_demo

        return run_demo(Path(args.dir) if args.dir else None)
    if args.command == "hash-password":
        return hash_password_command(args.password, args.scheme)
    module = import_module(_EXTRA_COMMANDS[args.command])
    return int(module.run(args))


def hash_password_command(given: str | None, scheme: str) -> int:
    """Prints the hash; the password comes from the command line, a terminal or stdin."""
    from cluster.passwords import hash_password

    if given is not None:
        password = given
    elif sys.stdin.isatty():
        try:
            password = getpass.getpass("Password: ")
            if password and getpass.getpass("Password again: ") != password:
                return _refuse("the two passwords differ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return _refuse("no password given")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        return _refuse("the password is empty")
    try:
        print(hash_password(password, scheme))
    except ValueError as exc:
        return _refuse(str(exc))
    return EXIT_OK


def _refuse(reason: str) -> int:
    print(f"sendguard: hash-password: {reason}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
