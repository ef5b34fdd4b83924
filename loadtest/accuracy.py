"""Limit accuracy under concurrency: ``sendguard loadtest accuracy``.

It starts its own cluster on loopback (a temporary configuration with small
limits, its own DNS server, a recording sink as the smarthost), runs Locust
as a library in a child process (:mod:`loadtest.accuracy_load`) with users
hammering a few keys from many connections, optionally scales the cluster or
kills a worker mid-run, then checks for every key:

- accepted (acknowledged, or delivered though its reply was lost) <= limit;
- every acknowledged message reached the sink (nothing lost);
- every refusal is a SPEC §2 reply, to the letter, with the session's own id.

Two halves of the users make both kinds of key reach their limit: the
"accounts" half sends as four accounts with their own small limits, from
one address per user, one message per session; the "addresses" half sends
as one account whose limit is never reached, from three addresses under
the global per-address limit, three messages per session.

Exit status: 0 every check passed, 1 a check failed (or the run broke).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.keys import account_key, ip_key
from cluster.passwords import hash_password
from cluster.ring import Ring
from loadtest.accuracy_load import POLICY_VIOLATION
from loadtest.bench_core import PASSWORD, ROOT, write_config
from loadtest.loopback import free_port
from loadtest.recording_sink import SinkThread
from loadtest.scenario import ClusterProcess, patch_config, quiet_dns

DOMAIN = "loadtest.pl"
BULK = f"bulk@{DOMAIN}"
BULK_LIMIT = 1_000_000
ADDRESS_SOURCES = ["127.0.30.1", "127.0.30.2", "127.0.30.3"]


@dataclass
class Scenario:
    workers: int = 2
    users: int = 50
    duration: float = 30.0
    scale_to: int | None = None
    kill_worker: bool = False
    ip_limit: int = 100
    account_limits: tuple[int, ...] = (10, 40, 160, 480)
    # Keep the load going past `duration` (up to `max_duration`) until this many
    # of the smallest account limits were reached: a slow machine then takes
    # longer instead of leaving a limit untested.
    until_limits: int = 0
    max_duration: float = 0.0
    settle: float = 90.0
    keep: bool = False
    events: list[str] = field(default_factory=list)

    @property
    def accounts(self) -> dict[str, int]:
        return {f"a{i}@{DOMAIN}": limit for i, limit in enumerate(self.account_limits, 1)}


def write_tenants(path: Path, scenario: Scenario) -> None:
    stored = hash_password(PASSWORD)
    lines = [f'[domains."{DOMAIN}"]', 'countries = ["PL"]', ""]
    for user, limit in [*scenario.accounts.items(), (BULK, BULK_LIMIT)]:
        lines += [f'[accounts."{user}"]', f'password = "{stored}"',
                  f'limits = [{{window = "1h", max = {limit}}}]', ""]
    path.write_text("\n".join(lines))


def plan(scenario: Scenario, port: int) -> dict[str, Any]:
    hammer_accounts = max(1, scenario.users // 2)
    hammer_addresses = max(1, scenario.users - hammer_accounts)
    return {
        "host": f"smtp://127.0.0.1:{port}",
        "duration": scenario.duration,
        "max_duration": max(scenario.max_duration, scenario.duration),
        "until_refused": sorted(scenario.accounts, key=scenario.accounts.__getitem__)
        [:scenario.until_limits],
        "rcpt_domain": "example.org",
        "groups": [
            {"name": "accounts", "users": hammer_accounts, "messages_per_session": 1,
             "accounts": [[u, PASSWORD, u] for u in scenario.accounts],
             "source_ips": [f"127.0.20.{i}" for i in range(1, min(hammer_accounts, 250) + 1)]},
            {"name": "addresses", "users": hammer_addresses, "messages_per_session": 3,
             "accounts": [[BULK, PASSWORD, BULK]], "source_ips": ADDRESS_SOURCES},
        ],
    }


def disturb(cluster: ClusterProcess, scenario: Scenario, started: float) -> None:
    """Scale and/or kill a worker while the load runs (at 1/3 and 2/3, or at 1/2)."""
    actions: list[str] = []
    if scenario.scale_to is not None:
        actions.append("scale")
    if scenario.kill_worker:
        actions.append("kill")
    for number, action in enumerate(actions, 1):
        at = started + scenario.duration * number / (len(actions) + 1)
        time.sleep(max(0.0, at - time.monotonic()))
        when = f"t={time.monotonic() - started:.1f}s"
        if action == "scale":
            reply = cluster.scale(scenario.scale_to)  # type: ignore[arg-type]
            scenario.events.append(f"{when}: scaled from {reply['previous']} "
                                   f"to {reply['workers']} workers")
            continue
        status = cluster.status()
        # The owner of the largest account limit is the one most likely still counting.
        hot = max(scenario.accounts, key=lambda user: scenario.accounts[user])
        owner = Ring(status["ring"]).owner(account_key(hot))
        pid = next(w["pid"] for w in status["workers"] if w["name"] == owner)
        os.kill(pid, signal.SIGKILL)
        scenario.events.append(f"{when}: killed worker {owner} (pid {pid}, owner of "
                               f"{account_key(hot)}) with SIGKILL")


def settle(sink: SinkThread, acked: set[str], timeout: float) -> None:
    """Until every acknowledged token arrived and arrivals stopped for 2 s (or timeout)."""
    deadline = time.monotonic() + timeout
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count, tokens = sink.recorder.snapshot()
        if count != last:
            last, quiet_since = count, time.monotonic()
        elif acked.issubset(tokens) and time.monotonic() - quiet_since >= 2.0:
            return
        time.sleep(0.2)


def _order(key: str) -> tuple[int, int, str]:
    """Accounts first, then addresses in numeric order."""
    if key.startswith("ip:"):
        return (1, int(ipaddress.ip_address(key[3:])), key)
    return (0, 0, key)


def compare(scenario: Scenario, load: dict[str, Any],
            received: Counter[str]) -> dict[str, Any]:
    sent: dict[str, list[str]] = load["sent"]
    acked = set(load["acked"])
    accepted = acked | (set(received) & set(sent))
    limits: dict[str, int] = {account_key(u): n for u, n in scenario.accounts.items()}
    limits[account_key(BULK)] = BULK_LIMIT
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for token, (account, source) in sent.items():
        for key in (account_key(account), ip_key(source)):
            limits.setdefault(key, scenario.ip_limit)
            counts[key]["accepted"] += token in accepted
            counts[key]["lost"] += token in acked and token not in received
    kinds: Counter[str] = Counter()
    for step, kind, account, source, count in load["refusals"]:
        kinds[f"{step}: {kind}"] += count
        if kind == POLICY_VIOLATION:
            for key in (account_key(account), ip_key(source)):
                limits.setdefault(key, scenario.ip_limit)
                counts[key]["refused"] += count
    rows: list[dict[str, Any]] = []
    for key in sorted(limits, key=_order):
        row = counts[key]
        rows.append({"key": key, "limit": limits[key], "accepted": row["accepted"],
                     "refused": row["refused"], "over": row["accepted"] - limits[key],
                     "lost": row["lost"]})
    unknown = sum(n for token, n in received.items() if token not in sent)
    over = sum(max(0, row["over"]) for row in rows)
    lost = sum(row["lost"] for row in rows if row["key"].startswith("acct:"))
    failures = []
    if over:
        failures.append(f"{over} message(s) over a limit")
    if lost:
        failures.append(f"{lost} acknowledged message(s) never reached the sink")
    if load["wrong_count"]:
        failures.append(f"{load['wrong_count']} reply(ies) not as SPEC §2 words them")
    if load["errors"] and not scenario.kill_worker:
        failures.append(f"{sum(load['errors'].values())} broken connection(s) without a kill")
    if not acked:
        failures.append("nothing was acknowledged")
    return {
        "rows": rows, "refusals": dict(kinds.most_common()), "errors": load["errors"],
        "wrong": load["wrong"], "wrong_count": load["wrong_count"],
        "sent": len(sent), "acknowledged": len(acked), "received": len(set(received)),
        "received_unacknowledged": len(accepted - acked),
        "duplicates": sum(n - 1 for n in received.values() if n > 1), "unknown": unknown,
        "over_admission": over, "lost": lost, "requests": load["requests"],
        "events": scenario.events, "failures": failures, "ok": not failures,
    }


def run_scenario(scenario: Scenario) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="sgacc-", dir="/tmp"))
    result: dict[str, Any] = {"folder": str(folder)}
    dns = quiet_dns()
    sink = SinkThread(free_port()).start()
    cluster: ClusterProcess | None = None
    child: subprocess.Popen[str] | None = None
    try:
        port = free_port()
        config = write_config(folder, port, dns.address, sink.port, scenario.workers,
                              folder / "spool")
        patch_config(config, {'window = "1m"\nmax = 10000000':
                              f'window = "1h"\nmax = {scenario.ip_limit}'})
        write_tenants(folder / "tenants.toml", scenario)
        cluster = ClusterProcess(config, folder / "run", port, folder / "stderr.txt")
        cluster.start(scenario.workers)
        (folder / "plan.json").write_text(json.dumps(plan(scenario, port)))
        with open(folder / "locust.txt", "w") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "loadtest.accuracy_load", str(folder / "plan.json"),
                 str(folder / "load.json")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                stderr=log)
        assert child.stdout is not None
        if child.stdout.readline().strip() != "running":
            raise RuntimeError(f"the Locust process did not start: {folder / 'locust.txt'}")
        disturb(cluster, scenario, time.monotonic())
        longest = max(scenario.max_duration, scenario.duration)
        if child.wait(longest + 120) != 0:
            raise RuntimeError(f"the Locust process failed: {folder / 'locust.txt'}")
        load = json.loads((folder / "load.json").read_text())
        final = scenario.scale_to if scenario.scale_to is not None else scenario.workers
        cluster.wait_serving(final, 90)
        settle(sink, set(load["acked"]), scenario.settle)
        result.update(compare(scenario, load, sink.recorder.snapshot()[1]))
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, OSError, ValueError,
            KeyError) as exc:
        result.update({"ok": False, "failures": [f"the run broke: {exc}"],
                       "events": scenario.events})
    finally:
        if child is not None:
            if child.poll() is None:
                child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        result["cluster_exit"] = cluster.stop() if cluster is not None else None
        sink.stop()
        dns.stop()
    if result["ok"] and not scenario.keep:
        shutil.rmtree(folder, ignore_errors=True)
        result["folder"] = ""
    return result


def format_result(scenario: Scenario, result: dict[str, Any]) -> str:
    from cluster.admin import table

    lines = [f"accuracy: {scenario.workers} workers, {scenario.users} users, "
             f"{scenario.duration:g} s; limits per address {scenario.ip_limit}/1h"]
    lines += [f"  {event}" for event in result.get("events", [])]
    if "rows" in result:
        rows = [[r["key"], r["limit"], r["accepted"], r["refused"],
                 f"+{r['over']}" if r["over"] > 0 else str(r["over"]), r["lost"]]
                for r in result["rows"]]
        lines += ["", table(["KEY", "LIMIT", "ACCEPTED", "REFUSED", "OVER/UNDER", "LOST"], rows),
                  "",
                  f"messages sent {result['sent']}, acknowledged {result['acknowledged']}, "
                  f"received by the sink {result['received']} (of which "
                  f"{result['received_unacknowledged']} queued but their reply lost, "
                  f"{result['duplicates']} duplicates, {result['unknown']} unknown)",
                  f"over-admission {result['over_admission']}, lost {result['lost']}, "
                  f"wrong replies {result['wrong_count']}"]
        lines += ["refusals:"] + [f"  {n:7d}  {kind}" for kind, n in result["refusals"].items()]
        if result["errors"]:
            lines += ["broken connections:"] + [f"  {n:7d}  {what}"
                                                for what, n in result["errors"].items()]
        lines += [f"  wrong: {w['step']} {w['reply']!r} (session {w['sid'] or '?'})"
                  for w in result["wrong"][:10]]
    verdict = "PASS" if result["ok"] else "FAIL: " + "; ".join(result["failures"])
    lines += ["", verdict]
    if result.get("folder"):
        lines.append(f"files kept in {result['folder']}")
    return "\n".join(lines)
