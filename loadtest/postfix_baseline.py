"""Postfix as a benchmark baseline: a private instance relaying to a sink on loopback.

Installing Postfix (Debian's package) replaces whatever MTA the machine has,
so :func:`install_postfix` runs only when the operator asked for it
(``--install-postfix``); it preseeds "No configuration" so the package
starts no system instance. The instance here has its own configuration
and queue folders (``postfix -c DIR``), listens on one loopback port, keeps
its durable queue (Postfix fsyncs each queue file before it answers 250) and
relays everything to ``[127.0.0.1]:relay_port``. It does no AUTH, so the
benchmark client skips AUTH for it; it offers STARTTLS with the same
certificate sendguard uses, so both pay for the same handshake.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"

# chroot off ("n" in the fifth column): the private folders need no copies of /etc.
MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
myhostname = postfix.bench.invalid
mydomain = bench.invalid
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:{relay_port}
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
smtp_tls_security_level = none
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
message_size_limit = 36700160
maillog_file = {log}
maillog_file_prefixes = {folder}
"""


class PostfixError(Exception):
    pass


def installed() -> bool:
    return os.access(POSTFIX, os.X_OK)


def version() -> str:
    if not installed():
        return ""
    done = subprocess.run([POSTCONF, "-d", "-h", "mail_version"], capture_output=True,
                          text=True, check=False)
    return done.stdout.strip()


def install_postfix() -> None:
    """apt-get install postfix, configured as "No configuration" (no system instance)."""
    if os.geteuid() != 0:
        raise PostfixError("installing Postfix needs root (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [
        (["debconf-set-selections"], "postfix postfix/main_mailer_type select No configuration\n"),
        (["apt-get", "update", "-q"], None),
        (["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"], None),
    ]
    for command, stdin in steps:
        done = subprocess.run(command, input=stdin, env=env, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise PostfixError(f"{' '.join(command)} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout)[-800:]}")
    if not installed():
        raise PostfixError(f"apt-get installed postfix but there is no {POSTFIX}")


class PostfixRelay:
    """One private Postfix instance under ``folder``; :meth:`start` and :meth:`stop` it."""

    def __init__(self, folder: Path, port: int, relay_port: int, cert: Path, key: Path) -> None:
        self.folder = folder
        self.port = port
        self.etc = folder / "etc"
        self.queue = folder / "queue"
        self.log = folder / "postfix.log"
        # Postfix's daemons run as the postfix user: everything they read must be reachable.
        for path in (folder, self.etc, self.queue, folder / "data"):
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(path, 0o755)
        shutil.chown(folder / "data", "postfix", "postfix")  # master.lock, TLS caches
        shutil.copy(cert, self.etc / "cert.pem")
        shutil.copy(key, self.etc / "key.pem")
        os.chmod(self.etc / "key.pem", 0o600)
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{port}"))
        (self.etc / "main.cf").write_text(MAIN_CF.format(
            queue=self.queue, data=folder / "data", relay_port=relay_port,
            cert=self.etc / "cert.pem", key=self.etc / "key.pem", log=self.log, folder=folder))

    def _postfix(self, action: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([POSTFIX, "-c", str(self.etc), action], capture_output=True,
                              text=True, check=False, timeout=120)
        if check and done.returncode != 0:
            raise PostfixError(f"postfix {action} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout)[-800:]} {self.log_tail()}")
        return done

    def start(self) -> PostfixRelay:
        self._postfix("start")
        return self

    def queued(self) -> int:
        """Messages still in the queue (incoming, active, deferred)."""
        total = 0
        for name in ("incoming", "active", "deferred", "maildrop"):
            for _, _, files in os.walk(self.queue / name):
                total += len(files)
        return total

    def master_pid(self) -> int | None:
        """The instance's master process (every other Postfix process descends from it)."""
        try:
            return int((self.queue / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        return self._postfix("status", check=False).returncode == 0

    def stop(self) -> None:
        if not self.running():
            return
        self._postfix("stop", check=False)
        deadline = time.monotonic() + 20
        while self.running():
            if time.monotonic() > deadline:
                self._postfix("abort", check=False)
                break
            time.sleep(0.2)

    def log_tail(self, size: int = 1200) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""
