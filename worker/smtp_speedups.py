"""Faster paths through aiosmtpd for what every session does.

Address parsing: ``SMTP._getaddr`` runs ``email._header_value_parser`` and
builds a ``typing.Protocol`` class on every MAIL and RCPT (about a third of
the CPU the gateway spends on a message at 100 messages per session). The
ordinary ``<dot.atom@domain>`` form is parsed with one regular expression
that accepts exactly what the full parser would turn into the same
``local@domain``; anything else goes to the full parser.

Per-class caching of aiosmtpd's per-connection introspection.

``SMTP.__init__`` scans the protocol and the handler with
``inspect.getmembers``, ``dir`` and ``inspect.signature`` on every
connection (about 120 µs here, most of the CPU of a one-message session's
set-up). What those scans find depends only on the classes, so the names
are looked up once per class and re-bound per instance.

Nothing is patched by importing this module: the worker's builder calls
:func:`install`, which rebinds names inside ``aiosmtpd.smtp`` only, and
only on the aiosmtpd releases whose internals these shortcuts were checked
against (:data:`CHECKED_RELEASES`, with a test each in
``tests/worker/test_smtp_overrides.py``); on any other release aiosmtpd
runs as it comes, slower but correct.
"""

from __future__ import annotations

import inspect
import re
import types
from typing import Any

import aiosmtpd
import aiosmtpd.smtp

# What ``SMTP.__init__`` and ``SMTP._getaddr`` look like in these releases is what
# the shortcuts below stand in for.
CHECKED_RELEASES = frozenset({"1.4.5", "1.4.6"})

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>(?=$|\s)\s*(.*)$", re.DOTALL)
_original_getaddr = aiosmtpd.smtp.SMTP._getaddr


def _fast_getaddr(self: Any, arg: str) -> tuple[str | None, str | None]:
    match = _SIMPLE_PATH.match(arg.lstrip()) if arg else None
    if match is None or (self.local_part_limit
                         and len(match.group(1).rpartition("@")[0]) > self.local_part_limit):
        return _original_getaddr(self, arg)
    return match.group(1), match.group(2)

_HOOK_PREFIXES = ("smtp_", "handle_", "auth_")
_names: dict[type, list[str]] = {}
_signatures: dict[Any, inspect.Signature] = {}


def _hook_names(obj: Any) -> list[str]:
    # Only the prefixes aiosmtpd filters on are kept; its comprehensions
    # then test a handful of names instead of every attribute.
    cls = type(obj)
    names = _names.get(cls)
    if names is None:
        names = _names[cls] = [n for n in dir(cls) if n.startswith(_HOOK_PREFIXES)]
    return names


def _cached_dir(obj: Any) -> list[str]:
    # Hooks must be defined on the class, as aiosmtpd's documentation has them.
    return dir(obj) if isinstance(obj, type) else _hook_names(obj)


def _getmembers(obj: Any, predicate: Any = None) -> list[tuple[str, Any]]:
    if predicate is not None or isinstance(obj, type):
        return inspect.getmembers(obj, predicate)
    return [(name, getattr(obj, name)) for name in _hook_names(obj) if name.startswith("auth_")]


def _signature(obj: Any, *args: Any, **kwargs: Any) -> inspect.Signature:
    if args or kwargs:
        return inspect.signature(obj, *args, **kwargs)
    key = obj.__func__ if isinstance(obj, types.MethodType) else obj
    signature = _signatures.get(key)
    if signature is None:
        signature = _signatures[key] = inspect.signature(obj)
    return signature


class _CachedInspect(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


def install() -> bool:
    """Patch aiosmtpd in this process (once); False, and nothing patched, on a release
    these shortcuts were not checked against."""
    if aiosmtpd.__version__ not in CHECKED_RELEASES:
        return False
    if isinstance(aiosmtpd.smtp.inspect, _CachedInspect):
        return True
    shim = _CachedInspect("inspect")
    shim.getmembers = _getmembers  # type: ignore[attr-defined]
    shim.signature = _signature  # type: ignore[attr-defined]
    aiosmtpd.smtp.inspect = shim  # type: ignore[attr-defined]
    aiosmtpd.smtp.dir = _cached_dir  # type: ignore[attr-defined]
    aiosmtpd.smtp.SMTP._getaddr = _fast_getaddr  # type: ignore[method-assign]
    return True
