"""The throughput benchmark's results: CSV files, the summary table and the plot.

Ratios are taken within one round (the same minutes of the same machine)
and only then summarised, so a noisy neighbour moves both sides of a ratio.
The plot needs matplotlib (the ``load`` extra); without it the CSV files
and the table are still written, and the command says the plot was skipped.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

RUN_FIELDS = ["round", "target", "kind", "workers", "msgs_per_session", "messages", "accepted",
              "refused", "errors", "seconds", "msgs_per_s", "delivered_per_s", "backlog",
              "first_error"]
SUMMARY_FIELDS = ["what", "subject", "versus", "workers", "msgs_per_session", "rounds",
                  "median", "min", "max"]


def _spread(values: list[float], digits: int) -> dict[str, Any]:
    return {"rounds": len(values), "median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rates: dict[tuple[str, str, int, int], list[float]] = defaultdict(list)
    rounds: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        rates[(row["target"], row["kind"], row["workers"], row["msgs_per_session"])].append(
            row["msgs_per_s"])
        rounds[(row["round"], row["msgs_per_session"])].append(row)
    summary = [{"what": "msgs/s", "subject": target, "versus": "", "workers": workers,
                "msgs_per_session": per_session, **_spread(values, 1)}
               for (target, _, workers, per_session), values in rates.items()]
    ratios: dict[tuple[str, str, int, int], list[float]] = defaultdict(list)
    for (_, per_session), measured in rounds.items():
        for ours in (r for r in measured if r["kind"] == "sendguard"):
            for base in (r for r in measured if r["kind"] != "sendguard"):
                if base["msgs_per_s"]:
                    ratios[(ours["target"], base["target"], ours["workers"], per_session)].append(
                        ours["msgs_per_s"] / base["msgs_per_s"])
    summary += [{"what": "ratio", "subject": ours, "versus": base, "workers": workers,
                 "msgs_per_session": per_session, **_spread(values, 2)}
                for (ours, base, workers, per_session), values in ratios.items()]
    summary.sort(key=lambda r: (r["what"] != "msgs/s", r["msgs_per_session"], r["versus"],
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

    rates = [r for r in summary if r["what"] == "msgs/s"]
    sessions = sorted({r["msgs_per_session"] for r in rates})
    figure, axes = plt.subplots(1, len(sessions), figsize=(5.2 * len(sessions), 4.4),
                                squeeze=False)
    colours = ["tab:orange", "tab:green", "tab:red", "tab:purple"]
    for axis, per_session in zip(axes[0], sessions, strict=True):
        ours = sorted((r for r in rates if r["msgs_per_session"] == per_session
                       and r["subject"].startswith("sendguard")), key=lambda r: r["workers"])
        workers = [r["workers"] for r in ours]
        axis.errorbar(workers, [r["median"] for r in ours],
                      yerr=[[r["median"] - r["min"] for r in ours],
                            [r["max"] - r["median"] for r in ours]],
                      marker="o", capsize=4, color="tab:blue",
                      label="sendguard (every policy, durable spool)")
        bases = [r for r in rates if r["msgs_per_session"] == per_session
                 and not r["subject"].startswith("sendguard")]
        for base, colour in zip(bases, colours, strict=False):
            axis.axhline(base["median"], linestyle="--", color=colour, label=base["subject"])
            axis.axhspan(base["min"], base["max"], color=colour, alpha=0.12)
        axis.set_title(f"{per_session} message{'s' if per_session > 1 else ''} per session")
        axis.set_xlabel("sendguard workers")
        axis.set_ylabel("messages accepted per second")
        axis.set_xticks(workers or [1])
        axis.set_xlim(min(workers or [1]) - 0.5, max(workers or [1]) + 0.5)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def table(summary: list[dict[str, Any]]) -> str:
    lines = ["msgs/s: median (min-max) over rounds"]
    rates = [r for r in summary if r["what"] == "msgs/s"]
    for subject in dict.fromkeys(r["subject"] for r in rates):
        cells = [f"{r['msgs_per_session']:3d}/session {r['median']:7.0f} "
                 f"({r['min']:.0f}-{r['max']:.0f})"
                 for r in rates if r["subject"] == subject]
        lines.append(f"  {subject:24s} " + "   ".join(cells))
    lines.append("ratios sendguard / baseline, same round: median (min-max)")
    for row in (r for r in summary if r["what"] == "ratio"):
        lines.append(f"  {row['subject']:14s} / {row['versus']:24s} "
                     f"{row['msgs_per_session']:3d}/session  {row['median']:5.2f} "
                     f"({row['min']:.2f}-{row['max']:.2f})")
    return "\n".join(lines)


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
