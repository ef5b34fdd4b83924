"""The throughput benchmark's results: CSV files, the summary table and the plot.

Ratios are taken within one round (the same minutes of the same machine)
and only then summarised, so a noisy neighbour moves both sides of a ratio.
CPU per message is compared as sendguard N workers / 1 worker (of the same
source tree), sendguard / every baseline (stock aiosmtpd, bare sink,
Postfix), and this tree / each ``--compare`` tree at the same worker count.
The plot needs matplotlib (the ``load`` extra); without it the CSV files
and the table are still written, and the command says the plot was skipped.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

RUN_FIELDS = ["round", "target", "kind", "tree", "workers", "msgs_per_session", "messages",
              "accepted", "refused", "errors", "seconds", "msgs_per_s", "cpu_ms_per_msg",
              "delivered_per_s", "backlog", "sink_cpu_ms_per_msg", "sink_sessions_per_1000",
              "first_error"]
SUMMARY_FIELDS = ["what", "subject", "versus", "workers", "msgs_per_session", "rounds",
                  "median", "min", "max"]
# Per target: (summary name, row field, digits)
_FIGURES = [("msgs/s", "msgs_per_s", 1), ("cpu ms/msg", "cpu_ms_per_msg", 3),
            ("sink cpu ms/msg", "sink_cpu_ms_per_msg", 3),
            ("sink sessions/1000", "sink_sessions_per_1000", 1)]


def _spread(values: list[float], digits: int) -> dict[str, Any]:
    return {"rounds": len(values), "median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


def _cpu_pairs(measured: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The CPU-per-message comparisons of one round: (subject, versus)."""
    ours = [r for r in measured if r["kind"] == "sendguard"]
    pairs = []
    for row in ours:
        for other in measured:
            if other["kind"] != "sendguard":
                pairs.append((row, other))  # against every baseline: stock, bare, Postfix
            elif other["tree"] == row["tree"] and other["workers"] == 1 < row["workers"]:
                pairs.append((row, other))  # N workers / 1 worker of the same code
            elif not row["tree"] and other["tree"] and other["workers"] == row["workers"]:
                pairs.append((row, other))  # this code / another tree (--compare)
    return pairs


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    figures: dict[tuple[str, str, int, int], list[float]] = defaultdict(list)
    rounds: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        for what, name, _ in _FIGURES:
            if row.get(name, "") != "":
                figures[(what, row["target"], row["workers"], row["msgs_per_session"])].append(
                    float(row[name]))
        rounds[(row["round"], row["msgs_per_session"])].append(row)
    digits = {what: d for what, _, d in _FIGURES}
    summary = [{"what": what, "subject": target, "versus": "", "workers": workers,
                "msgs_per_session": per_session, **_spread(values, digits[what])}
               for (what, target, workers, per_session), values in figures.items()]
    ratios: dict[tuple[str, str, str, int, int], list[float]] = defaultdict(list)
    for (_, per_session), measured in rounds.items():
        for ours in (r for r in measured if r["kind"] == "sendguard"):
            for base in (r for r in measured if r["kind"] != "sendguard"):
                if base["msgs_per_s"]:
                    ratios[("msgs/s ratio", ours["target"], base["target"], ours["workers"],
                            per_session)].append(ours["msgs_per_s"] / base["msgs_per_s"])
        for ours, base in _cpu_pairs(measured):
            if base["cpu_ms_per_msg"]:
                ratios[("cpu ratio", ours["target"], base["target"], ours["workers"],
                        per_session)].append(ours["cpu_ms_per_msg"] / base["cpu_ms_per_msg"])
    summary += [{"what": what, "subject": ours, "versus": base, "workers": workers,
                 "msgs_per_session": per_session, **_spread(values, 2)}
                for (what, ours, base, workers, per_session), values in ratios.items()]
    order = {what: i for i, what in enumerate([w for w, _, _ in _FIGURES]
                                               + ["cpu ratio", "msgs/s ratio"])}
    summary.sort(key=lambda r: (order[r["what"]], r["msgs_per_session"], r["versus"],
                                r["subject"]))
    return summary


def write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("msgs/s", "messages accepted per second"),
               ("cpu ms/msg", "server CPU ms per accepted message")]
    sessions = sorted({r["msgs_per_session"] for r in summary if r["what"] == "msgs/s"})
    figure, axes = plt.subplots(len(metrics), len(sessions),
                                figsize=(5.2 * len(sessions), 4.0 * len(metrics)), squeeze=False)
    colours = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for axes_row, (what, label) in zip(axes, metrics, strict=True):
        for axis, per_session in zip(axes_row, sessions, strict=True):
            shown = [r for r in summary if r["what"] == what and not r["versus"]
                     and r["msgs_per_session"] == per_session]
            # One line per sendguard source tree ("sendguard", "sendguard@before", ...).
            trees = dict.fromkeys(r["subject"].rsplit(" ", 1)[0] for r in shown
                                  if r["subject"].startswith("sendguard"))
            workers: list[int] = []
            for tree, colour in zip(trees, ["tab:blue", "tab:cyan", "tab:olive"], strict=False):
                ours = sorted((r for r in shown if r["subject"].rsplit(" ", 1)[0] == tree),
                              key=lambda r: r["workers"])
                workers = sorted({*workers, *(r["workers"] for r in ours)})
                axis.errorbar([r["workers"] for r in ours], [r["median"] for r in ours],
                              yerr=[[r["median"] - r["min"] for r in ours],
                                    [r["max"] - r["median"] for r in ours]],
                              marker="o", capsize=4, color=colour, label=tree)
            bases = [r for r in shown if not r["subject"].startswith("sendguard")]
            for base, colour in zip(bases, colours, strict=False):
                axis.axhline(base["median"], linestyle="--", color=colour,
                             label=base["subject"])
                axis.axhspan(base["min"], base["max"], color=colour, alpha=0.12)
            axis.set_title(f"{per_session} message{'s' if per_session > 1 else ''} per session")
            axis.set_xlabel("sendguard workers")
            axis.set_ylabel(label)
            axis.set_xticks(workers or [1])
            axis.set_xlim(min(workers or [1]) - 0.5, max(workers or [1]) + 0.5)
            axis.set_ylim(bottom=0)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7, loc="best")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def table(summary: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any] | None, fmt: str) -> str:
        if row is None:
            return ""
        return f"{row['median']:{fmt}} ({row['min']:{fmt}}-{row['max']:{fmt}})"

    def find(what: str, subject: str, per_session: int) -> dict[str, Any] | None:
        return next((r for r in summary if r["what"] == what and r["subject"] == subject
                     and r["msgs_per_session"] == per_session and not r["versus"]), None)

    lines = ["median (min-max) over rounds; CPU: every process of the target, delivery of "
             "what it accepted included, ms per accepted message"]
    sessions = sorted({r["msgs_per_session"] for r in summary})
    subjects = list(dict.fromkeys(r["subject"] for r in summary if r["what"] == "msgs/s"))
    width = max([24, *(len(subject) for subject in subjects)])
    for per_session in sessions:
        lines.append(f"{per_session} msg(s)/session:".ljust(width + 3) + f"{'msgs/s':21s}"
                     "server CPU ms/msg      sink CPU ms/msg   sink sessions/1000")
        for subject in subjects:
            rate = find("msgs/s", subject, per_session)
            if rate is None:
                continue
            lines.append(f"  {subject:{width}s} {cell(rate, '.0f'):20s} "
                         f"{cell(find('cpu ms/msg', subject, per_session), '.2f'):22s} "
                         f"{cell(find('sink cpu ms/msg', subject, per_session), '.2f'):17s} "
                         f"{cell(find('sink sessions/1000', subject, per_session), '.0f')}")
    lines.extend(_targets(summary))
    for what, title in (("cpu ratio", "CPU per message, ratio in the same round"),
                        ("msgs/s ratio", "msgs/s, sendguard / baseline in the same round")):
        lines.append(f"{title}: median (min-max)")
        for row in (r for r in summary if r["what"] == what):
            lines.append(f"  {row['subject']:{width}s} / {row['versus']:{width}s} "
                         f"{row['msgs_per_session']:3d}/session  {row['median']:5.2f} "
                         f"({row['min']:.2f}-{row['max']:.2f})")
    return "\n".join(lines)


# The performance targets on CPU per message: (versus, msgs/session, at most), for
# sendguard at 2 workers (this tree): against 1 worker, Postfix and stock aiosmtpd.
TARGETS = [("sendguard 1w", 100, 1.15), ("sendguard 1w", 1, 1.2), ("postfix", 100, 0.6),
           ("stock aiosmtpd", 100, 4.5)]


def _targets(summary: list[dict[str, Any]]) -> list[str]:
    lines = ["targets, sendguard 2 workers, CPU per message (median ratio of the rounds)"]
    for versus, per_session, limit in TARGETS:
        row = next((r for r in summary if r["what"] == "cpu ratio"
                    and r["subject"] == "sendguard 2w" and r["versus"].startswith(versus)
                    and r["msgs_per_session"] == per_session), None)
        if row is None:
            lines.append(f"  / {versus:18s} {per_session:3d}/session  at most {limit:4.2f}: "
                         "not measured")
            continue
        verdict = "met" if row["median"] <= limit else "NOT met"
        lines.append(f"  / {row['versus']:18s} {per_session:3d}/session  at most {limit:4.2f}: "
                     f"{row['median']:.2f} ({row['min']:.2f}-{row['max']:.2f}) {verdict}")
    return lines


def report(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    write_csv(out / "bench-runs.csv", RUN_FIELDS, rows)
    write_csv(out / "bench-summary.csv", SUMMARY_FIELDS, summary)
    title = ", ".join(f"{k} {v}" for k, v in meta.items())
    plotted = plot(summary, out / "bench.png", title)
    note = (f"plot: {out / 'bench.png'}" if plotted else
            "plot: skipped, matplotlib is not installed (pip install -e '.[load]')")
    return "\n".join([table(summary), "", title, f"runs: {out / 'bench-runs.csv'}",
                      f"summary: {out / 'bench-summary.csv'}", note])
