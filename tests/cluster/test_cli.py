"""The command line as an operator types it: ``-c`` anywhere, hash-password, check-config."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gateway import COUNTRIES, TENANTS, toml_document
from geoipdb import write_country_db

from cluster.passwords import verify_password
from cluster.selfsigned import write_self_signed

ROOT = Path(__file__).resolve().parents[2]


def sendguard(*args: str, stdin: str = "", env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A complete configuration whose every named file exists and is good."""
    write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", "mx.test")
    write_country_db(tmp_path / "country.mmdb", COUNTRIES)
    (tmp_path / "tenants.toml").write_text(TENANTS)
    path = tmp_path / "sendguard.toml"
    path.write_text(toml_document({
        "server": {"listen": ["127.0.0.1:2587"], "tls_cert": "cert.pem", "tls_key": "key.pem"},
        "tenants": {"file": "tenants.toml"},
        "geoip": {"database": "country.mmdb"},
        "cluster": {"runtime_dir": str(tmp_path / "run")},
        "delivery": {"spool": "spool"},
        "log": {"file": "sendguard.log"},
    }))
    return path


# -- -c before or after the command ----------------------------------------------------


def test_config_may_stand_before_or_after_the_command(config: Path) -> None:
    for args in (("-c", str(config), "check-config"), ("check-config", "-c", str(config)),
                 ("--config", str(config), "check-config")):
        done = sendguard(*args)
        assert (done.returncode, done.stdout, done.stderr) == (0, f"{config}: ok\n", ""), args
    # A command that needs the running cluster: the same answer either way.
    before, after = sendguard("-c", str(config), "status"), sendguard("status", "-c", str(config))
    assert before.returncode == after.returncode == 1
    assert before.stderr == after.stderr and before.stderr.count("\n") == 1
    # Nested commands too, and the one after the command wins.
    done = sendguard("-c", "/nonexistent.toml", "queue", "list", "-c", str(config))
    assert "nonexistent" not in done.stderr


def test_the_default_configuration_comes_from_the_environment(config: Path) -> None:
    done = sendguard("check-config", env={"SENDGUARD_CONFIG": str(config)})
    assert (done.returncode, done.stdout) == (0, f"{config}: ok\n")


def test_a_command_without_a_configuration_refuses_c(config: Path) -> None:
    done = sendguard("-c", str(config), "demo")
    assert done.returncode == 2 and "demo takes no -c" in done.stderr


# -- support commands: bad usage is status 2, before any cluster is asked ----------------


@pytest.mark.parametrize(("args", "error"), [
    (("why", "not-a-sid"), 'why: "not-a-sid" is not a session id'),
    (("account", "suspend", "jan@kowalski.pl", "--reason", " "), "--reason must say why"),
    (("account", "suspend", "jan@kowalski.pl", "--reason", "x", "--for", "0s"),
     '--for: "0s" is not a duration'),
    (("account", "suspend", "jan", "--reason", "x"), "is not an account"),
    (("counters", "reset", "ip", "1.2.3"), "is not an IP address"),
    (("tenant", "allow-country", "kowalski.pl", "DE", "--for", "soon"),
     '--for: "soon" is not a duration'),
    (("tenant", "allow-country", "kowalski.pl", "POL"), "not a two-letter country code"),
    (("tenant", "allow-country", "kowalski.pl", "DE", "--reason", "two\nlines"),
     "--reason must be one line of at most 500 characters"),
    (("account", "unsuspend", "jan@kowalski.pl", "--by", " "), "--by must name who"),
    (("counters", "reset", "account", "jan@kowalski.pl", "--reason", "x" * 501),
     "--reason must be one line"),
    (("queue", "hold", "--account", "jan@kowalski.pl", "--by", "a\tb"),
     "queue hold: --by must be one line"),
])
def test_support_commands_refuse_bad_usage_with_status_2(
        config: Path, args: tuple[str, ...], error: str) -> None:
    # No cluster runs for this configuration: status 1 would mean the request was sent.
    done = sendguard(*args, "-c", str(config))
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.count("\n") == 1 and error in done.stderr, done.stderr


# -- hash-password ---------------------------------------------------------------------


def test_hash_password_reads_stdin_and_refuses_an_empty_password() -> None:
    done = sendguard("hash-password", "--scheme", "PLAIN", stdin="s3cret pass\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "{PLAIN}s3cret pass\n", "")
    for given in ("\n", "", "\r\n"):
        done = sendguard("hash-password", stdin=given)
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr == "sendguard: hash-password: the password is empty\n"
    done = sendguard("hash-password", "")
    assert done.returncode == 2 and done.stderr.count("\n") == 1


def _on_a_terminal(*answers: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """hash-password with a pseudo-terminal as its controlling terminal and stdin.

    Returns the finished process and everything the terminal showed."""
    master, slave = os.openpty()
    # A session leader that opens the terminal by name makes it its controlling one,
    # which getpass needs (it reads /dev/tty).
    boot = ("import os, sys; os.close(os.open(os.ttyname(0), os.O_RDWR)); "
            "from cluster.cli import main; sys.exit(main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", boot, "hash-password", "--scheme", "PLAIN"],
                               cwd=ROOT, stdin=slave, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    os.close(slave)
    shown = b""
    prompts = iter(["Password: ", "Password again: "])
    try:
        for answer in answers:
            prompt = next(prompts).encode()
            deadline = time.monotonic() + 30
            while not shown.endswith(prompt):
                assert time.monotonic() < deadline, f"no prompt {prompt!r}: {shown!r}"
                if select.select([master], [], [], 0.5)[0]:
                    shown += os.read(master, 1024)
            os.write(master, answer.encode() + b"\n")
        stdout, stderr = process.communicate(timeout=30)
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 1024)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), \
        shown.decode()


def test_hash_password_on_a_terminal_asks_twice_without_echo() -> None:
    done, shown = _on_a_terminal("tajne hasło", "tajne hasło")
    assert (done.returncode, done.stderr) == (0, "")
    assert verify_password(done.stdout.strip(), "tajne hasło")
    assert "Password: " in shown and "Password again: " in shown
    assert "tajne" not in shown  # nothing typed was echoed


def test_hash_password_on_a_terminal_refuses_two_different_passwords() -> None:
    done, shown = _on_a_terminal("one password", "another one")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "sendguard: hash-password: the two passwords differ\n"
    assert "password" not in shown.replace("Password", "")


# -- check-config opens every file -------------------------------------------------------


def edit(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


def one_line_error(config: Path) -> str:
    done = sendguard("check-config", "-c", str(config))
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip()


def test_check_config_refuses_a_missing_certificate(config: Path) -> None:
    (config.parent / "cert.pem").unlink()
    assert one_line_error(config) == (
        f'{config}: server.tls_cert: no such file (got "{config.parent / "cert.pem"}")')


def test_check_config_refuses_a_key_that_is_not_the_certificates(config: Path) -> None:
    other = config.parent / "other"
    other.mkdir()
    write_self_signed(other / "cert.pem", other / "key.pem", "mx.test")
    shutil.copy(other / "key.pem", config.parent / "key.pem")
    assert one_line_error(config) == (
        f"{config}: server.tls_key: does not belong to the certificate "
        f'{config.parent / "cert.pem"} (got "{config.parent / "key.pem"}")')


def test_check_config_refuses_files_that_are_not_pem(config: Path) -> None:
    (config.parent / "key.pem").write_text("not a key\n")
    assert one_line_error(config).startswith(f"{config}: server.tls_key: holds no PEM private key")
    (config.parent / "cert.pem").write_text("not a certificate\n")
    assert one_line_error(config).startswith(f"{config}: server.tls_cert: holds no PEM certificate")


def test_check_config_opens_the_geoip_database(config: Path) -> None:
    database = config.parent / "country.mmdb"
    database.write_bytes(b"this is not a MaxMind database")
    line = one_line_error(config)
    assert line.startswith(f"{config}: geoip.database: ") and line.endswith(f'(got "{database}")')
    database.unlink()
    assert one_line_error(config) == f'{config}: geoip.database: no such file (got "{database}")'


def test_check_config_reads_the_tenant_directory(config: Path) -> None:
    tenants = config.parent / "tenants.toml"
    tenants.write_text(TENANTS + '\n[accounts."x@nowhere.pl"]\npassword = "{PLAIN}x"\n')
    assert one_line_error(config).startswith(f"{tenants}: ")
    tenants.unlink()  # not there at all: the configuration's key is what is wrong
    assert one_line_error(config) == f'{config}: tenants.file: no such file (got "{tenants}")'


def test_check_config_checks_where_logs_and_the_spool_go(config: Path) -> None:
    edit(config, 'file = "sendguard.log"', 'file = "missing/folder/sendguard.log"')
    assert one_line_error(config).startswith(f"{config}: log.file: its folder ")
    edit(config, 'file = "missing/folder/sendguard.log"', 'file = "sendguard.log"')
    (config.parent / "spool").write_text("a file where the spool folder should be")
    assert one_line_error(config) == (
        f'{config}: delivery.spool: is not a folder (got "{config.parent / "spool"}")')


def test_check_config_reads_the_admin_users_file(config: Path) -> None:
    users = config.parent / "admins"
    users.write_text("# support\nanna:{PLAIN}a long passphrase\n")
    config.write_text(config.read_text()
                      + '\n[admin]\nlisten = "127.0.0.1:8026"\nusers_file = "admins"\n')
    assert sendguard("check-config", "-c", str(config)).returncode == 0
    users.write_text("anna:{PLAIN}a long passphrase\nbob:{MD5}x\n")
    assert one_line_error(config) == (
        f"{config}: admin.users_file: {users} line 2: unknown password scheme {{MD5}}; "
        f'supported schemes: ARGON2ID, ARGON2I, BLF-CRYPT, SHA512-CRYPT, PLAIN (got "{users}")')
    users.write_text("no colon here\n")
    assert one_line_error(config).startswith(
        f'{config}: admin.users_file: {users} line 1: must be "name:{{SCHEME}}hash"')


def test_check_config_reads_the_support_state_the_coordinator_would_refuse(
        config: Path) -> None:
    edit(config, "[cluster]\n", '[cluster]\nstate_dir = "state"\n')
    state = config.parent / "state"
    state.mkdir(mode=0o700)
    table = state / "suspensions.json"
    table.write_text('{"version": 1, "items": [{"account": "jan@kowalski.pl", "reason": "x", '
                     '"by": "anna", "at": 1796000000.0, "until": null}]}')
    assert sendguard("check-config", "-c", str(config)).returncode == 0
    table.write_text('{"version": 1, "items": [{"bogus": 1}]}')
    assert one_line_error(config) == (
        f"{config}: cluster.state_dir: {table}: suspension: account must be a string, got None")


def test_why_tells_a_shadow_limit_from_a_refusal() -> None:
    from cluster.support_cli import format_why

    sid = "A" * 22
    common = {"ts": "2026-12-05T10:00:00Z", "policy": "rate_limit", "client_ip": "192.0.2.1",
              "account": "jan@kowalski.pl", "reply": f"550 5.1.0 {sid} policy violation",
              "window": "1h", "max": 2, "clears_at": "2026-12-05T10:59:00Z"}
    text = format_why({"sid": sid, "decisions": [
        {**common, "stage": "MAIL", "verdict": "shadow", "key": "acct:jan@kowalski.pl",
         "count": 2},
        {**common, "stage": "MAIL", "verdict": "reject", "key": "ip:192.0.2.1", "count": 2}]})
    assert "MAIL shadow limit (not refused): acct:jan@kowalski.pl has 2 of 2 in 1h" in text
    assert "MAIL refusal: ip:192.0.2.1 has 2 of 2 in 1h" in text
