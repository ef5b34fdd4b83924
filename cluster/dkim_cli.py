"""``sendguard dkim keygen|record``: make a DKIM key and print its DNS record.

The keys themselves (where they live, how they are read, made and checked)
are :mod:`cluster.dkimkeys`; this is only the command line around them.
"""

from __future__ import annotations

import sys
from typing import Any

from cluster.dkimkeys import (
    DEFAULT_RSA_BITS,
    ED25519,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    RSA,
    DkimKeyError,
    generate_key,
    key_path,
    key_record,
    write_key,
    zone_line,
)
from cluster.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from cluster.names import BadDomain, to_alabel
from cluster.settings import load_settings
from cluster.tenants import selector_ok
from cluster.validate import ConfigError


def add_parser(commands: Any, name: str, config_arg: Any) -> None:
    dkim = commands.add_parser(name, help="DKIM signing keys")
    actions = dkim.add_subparsers(dest="dkim_command", required=True, metavar="ACTION")
    keygen = actions.add_parser("keygen", help="make a key and print its DNS record")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--type", choices=[RSA, ED25519], default=RSA, dest="key_type")
    keygen.add_argument("--bits", type=int, default=DEFAULT_RSA_BITS,
                        help=f"RSA key size (default {DEFAULT_RSA_BITS})")
    config_arg(keygen)
    record = actions.add_parser("record", help="print the DNS record of an existing key")
    record.add_argument("domain")
    record.add_argument("--selector", required=True)
    config_arg(record)


def run(args: Any) -> int:
    try:
        domain = to_alabel(args.domain)
    except BadDomain:
        print(f"sendguard dkim: {args.domain!r} is not a domain name", file=sys.stderr)
        return EXIT_USAGE
    if not selector_ok(args.selector):
        print(f"sendguard dkim: {args.selector!r} is not a selector: a DNS label like "
              '"sg2026"', file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    path = key_path(settings.dkim.keys_dir, domain, args.selector)
    if args.dkim_command == "record":
        try:
            value = key_record(path)
        except DkimKeyError as exc:
            print(f"sendguard dkim: {path} {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(zone_line(domain, args.selector, value))
        return EXIT_OK
    if args.key_type == RSA and not MIN_RSA_BITS <= args.bits <= MAX_RSA_BITS:
        print(f"sendguard dkim: --bits must be between {MIN_RSA_BITS} and {MAX_RSA_BITS} "
              f"(got {args.bits})", file=sys.stderr)
        return EXIT_USAGE
    if path.exists():
        print(f"sendguard dkim: {path} exists; to rotate, make a key under a new selector",
              file=sys.stderr)
        return EXIT_FAILED
    pem, value = generate_key(args.key_type, args.bits)
    try:
        write_key(path, pem)
    except OSError as exc:
        print(f"sendguard dkim: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    print(f"sendguard dkim: wrote {path}; publish this record, then set "
          f'dkim_selector = "{args.selector}" for {domain}', file=sys.stderr)
    print(zone_line(domain, args.selector, value))
    return EXIT_OK

