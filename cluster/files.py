"""Opens every file the configuration names, before anything is started with it.

``sendguard check-config`` and ``sendguard run`` (before it starts a single
process) call :func:`check_files`; the coordinator calls it again on SIGHUP
before a new configuration replaces the one in force. Each check raises
:class:`~cluster.validate.ConfigError`, so a bad file is one line naming
the key: ``FILE: KEY: what is wrong (got VALUE)``.

The checks open the files the way their users will (an SSL context for
the certificate, geoip2 for the GeoIP database) but keep nothing open.
"""

from __future__ import annotations

import os
import ssl
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cluster.admin_users import read_users
from cluster.dkimkeys import check_dkim_keys
from cluster.exits import EXIT_USAGE
from cluster.geoip import CountryDatabase, GeoDatabaseError
from cluster.settings import Settings, load_settings
from cluster.support_state import (
    EXCEPTIONS_FILE,
    SUSPENSIONS_FILE,
    CountryException,
    Suspension,
    TableError,
    read_table,
)
from cluster.tenants import load_tenants
from cluster.validate import ConfigError


def check_tls(settings: Settings) -> None:
    """The certificate and the key load, and belong together."""
    server = settings.server
    if server.tls_cert is None or server.tls_key is None:
        return
    cert_pem = _read(settings, "server.tls_cert", server.tls_cert)
    key_pem = _read(settings, "server.tls_key", server.tls_key)
    try:
        certificate = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ConfigError(settings.path, "server.tls_cert", "holds no PEM certificate",
                          str(server.tls_cert)) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(settings.path, "server.tls_key",
                          "holds no PEM private key without a passphrase",
                          str(server.tls_key)) from None
    if key.public_key() != certificate.public_key():
        raise ConfigError(settings.path, "server.tls_key",
                          f"does not belong to the certificate {server.tls_cert}",
                          str(server.tls_key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)  # as the workers will
    except ssl.SSLError as exc:
        raise ConfigError(settings.path, "server.tls_cert", f"cannot be used: {exc}",
                          str(server.tls_cert)) from None


def check_geoip(settings: Settings) -> None:
    path = settings.geoip.database
    if path is None:
        return
    _readable(settings, "geoip.database", path)
    try:
        CountryDatabase.from_path(path).close()
    except GeoDatabaseError as exc:
        raise ConfigError(settings.path, "geoip.database", str(exc), str(path)) from None


def check_tenants(settings: Settings) -> None:
    # A file that is not there is the configuration's mistake (tenants.file); what is
    # wrong inside it is the tenant file's, and its own errors name that file and entry.
    _readable(settings, "tenants.file", settings.tenants_file)
    load_tenants(settings.tenants_file)


def check_dkim(settings: Settings) -> None:
    # {dkim.keys_dir}/{domain}/{selector}.pem of every domain with a dkim_selector.
    check_dkim_keys(settings, load_tenants(settings.tenants_file))


def check_log_file(settings: Settings) -> None:
    if settings.log_file is not None:
        _writable_file(settings, "log.file", settings.log_file)


def check_spool(settings: Settings) -> None:
    _writable_folder(settings, "delivery.spool", settings.delivery.spool)


def check_state_dir(settings: Settings) -> None:
    folder = settings.cluster.state_dir
    _writable_folder(settings, "cluster.state_dir", folder)
    if settings.counters.backend == "redis":
        return  # the state is in Redis; what is here was moved there already
    # The coordinator reads these tables at start and refuses a bad one: so does this.
    try:
        read_table(folder / SUSPENSIONS_FILE, Suspension.from_wire)
        read_table(folder / EXCEPTIONS_FILE, CountryException.from_wire)
    except TableError as exc:
        raise ConfigError(settings.path, "cluster.state_dir", str(exc), show_value=False) \
            from None


def check_runtime_dir(settings: Settings) -> None:
    # What `run` would refuse (cluster/supervisor.py make_private_dir), without making it.
    folder = settings.cluster.runtime_dir
    if not os.path.lexists(folder):
        _writable_folder(settings, "cluster.runtime_dir", folder)
        return
    problem = private_dir_problem(folder)
    if problem is not None:
        raise ConfigError(settings.path, "cluster.runtime_dir", problem, str(folder))


def private_dir_problem(path: Path) -> str | None:
    """Why the existing ``path`` is not a folder of this user's alone, or None.

    Checked with ``lstat``: a symlink, a file, a folder of another user or one
    that group or others can enter would let someone else reach the control
    sockets (or swap them for theirs), so it is refused rather than repaired.
    """
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link, not a folder"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_uid != os.geteuid():
        return f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
    if info.st_mode & 0o077:
        return (f"is open to group or others (mode {info.st_mode & 0o777:04o}); "
                "it must be 0700")
    return None


def check_admin_users(settings: Settings) -> None:
    if settings.admin.users_file is not None:
        _readable(settings, "admin.users_file", settings.admin.users_file)
        read_users(settings.path, settings.admin.users_file)


# In order: the DKIM keys after the tenant directory that names them.
FILE_CHECKS: dict[str, Callable[[Settings], None]] = {
    "server.tls_cert": check_tls,
    "tenants.file": check_tenants,
    "dkim.keys_dir": check_dkim,
    "geoip.database": check_geoip,
    "log.file": check_log_file,
    "delivery.spool": check_spool,
    "cluster.state_dir": check_state_dir,
    "cluster.runtime_dir": check_runtime_dir,
    "admin.users_file": check_admin_users,
}


# Files the gateway runs without: a domain whose DKIM key cannot be read is
# sent unsigned and the key logged, so only check-config fails for them.
OPTIONAL_AT_START = ("dkim.keys_dir",)


def check_files(settings: Settings, *, only: tuple[str, ...] = (),
                skip: tuple[str, ...] = ()) -> None:
    """Raises ConfigError for the first file that cannot be used (``only``: just those
    checks; ``skip``: all but those)."""
    for name, check in FILE_CHECKS.items():
        if (not only or name in only) and name not in skip:
            check(settings)


def load_or_exit(path: str, *, open_files: bool = False, strict: bool = False) -> Settings:
    """The settings, or exit 2 with one line; ``open_files``: every file they name too
    (``strict``: also those the gateway can run without, as check-config does)."""
    try:
        settings = load_settings(path)
        if open_files:
            check_files(settings, skip=() if strict else OPTIONAL_AT_START)
        else:
            check_tenants(settings)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return settings


def _readable(settings: Settings, key: str, path: Path) -> None:
    _read(settings, key, path, size=0)


def _read(settings: Settings, key: str, path: Path, size: int = -1) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(size)
    except FileNotFoundError:
        raise ConfigError(settings.path, key, "no such file", str(path)) from None
    except IsADirectoryError:
        raise ConfigError(settings.path, key, "is a folder, not a file", str(path)) from None
    except OSError as exc:
        raise ConfigError(settings.path, key, f"cannot be read: {exc.strerror}",
                          str(path)) from None


def _writable_file(settings: Settings, key: str, path: Path) -> None:
    if path.is_dir():
        raise ConfigError(settings.path, key, "is a folder, not a file", str(path))
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ConfigError(settings.path, key, "is not writable", str(path))
        return
    if not path.parent.is_dir():
        raise ConfigError(settings.path, key, f"its folder {path.parent} does not exist",
                          str(path))
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(settings.path, key, f"cannot be created in {path.parent}", str(path))


def _writable_folder(settings: Settings, key: str, folder: Path) -> None:
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(settings.path, key, "is not a folder", str(folder))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(settings.path, key, "is not writable", str(folder))
        return
    parent = _existing_parent(folder)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(settings.path, key, f"does not exist and cannot be made in {parent}",
                          str(folder))


def _existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")
