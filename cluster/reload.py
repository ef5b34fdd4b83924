"""What a reload (SIGHUP) applies, and the one list of settings that need a restart.

A setting applies on reload by itself when the code reads it from the
current snapshot where it uses it (``snapshot().settings...``): policies,
limits, the SMTP session's host name, SIZE, recipients and timeouts (read
for every new connection), delivery. A few objects are built from settings
and rebuilt when their part changes (the worker's DNS resolver, spam
scanner and TLS certificate: worker/builder.py ``WorkerParts.follow_settings``;
the supervisor's worker count and drain timeout).

Everything else is bound or opened once per process: it is listed in
:data:`RESTART_ONLY`, and a reload that changes any of it logs one
``reload_partial`` warning naming those keys (the rest of the new file is in
force). A new setting is either read per use, or added here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cluster.files import check_files
from cluster.settings import Settings, load_settings

RESTART_ONLY: dict[str, Callable[[Settings], object]] = {
    # Listening sockets, bound by each worker (and the coordinator) at start.
    "server.listen": lambda s: s.server.listen,
    "server.listen_tls": lambda s: s.server.listen_tls,
    "server.proxy_protocol": lambda s: s.server.proxy_protocol,
    "metrics.listen": lambda s: s.metrics_listen,
    "admin.listen": lambda s: s.admin.listen,
    # Files opened once under their path (their contents are reread when they change).
    "admin.users_file": lambda s: s.admin.users_file,
    # TLS on or off (a new certificate or key file applies on reload).
    "server.tls_cert": lambda s: s.server.tls_cert is None,
    # The cluster's own wiring, and where processes keep their state and memory.
    "cluster.runtime_dir": lambda s: s.cluster.runtime_dir,
    "cluster.state_dir": lambda s: s.cluster.state_dir,
    "cluster.request_timeout": lambda s: s.cluster.request_timeout,
    "admin.recent_decisions": lambda s: s.admin.recent_decisions,
    "admin.recent_decisions_for": lambda s: s.admin.recent_decisions_for,
    # Never half-applied: a reload that changes them is refused (coordinator/sources.py).
    "counters.backend": lambda s: s.counters.backend,
    "counters.redis_url": lambda s: s.counters.redis_url,
    "counters.redis_cluster": lambda s: s.counters.redis_cluster,
    "delivery.spool": lambda s: s.delivery.spool,
    "log.file": lambda s: s.log_file,
}

# Files a new configuration must be able to use before it replaces the old one
# (tenants and GeoIP are read by the coordinator's reload itself).
_RELOAD_CHECKS = ("server.tls_cert",)


def needs_restart(old: Settings, new: Settings) -> list[str]:
    """The restart-only keys whose value differs between ``old`` and ``new``."""
    return [key for key, read in RESTART_ONLY.items() if read(old) != read(new)]


def load_for_reload(path: Path) -> Settings:
    """The new settings, with the files they name checked; raises ConfigError."""
    settings = load_settings(path)
    check_files(settings, only=_RELOAD_CHECKS)
    return settings
