"""Aggregates over seeds and the markdown tables of study.md."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from .arms import Arm
from .corpus import NEW, ORIGINAL

METRICS = ("ppl", "exact", "format", "expert0")
ROW_ORDER = [arm.value for arm in Arm]


def aggregate(records: Sequence[dict]) -> list[dict]:
    """One row per (arm, learning rate): mean and sample standard deviation over seeds of every metric."""
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for rec in records:
        groups.setdefault((rec["arm"], rec["lr"]), []).append(rec)
    rows = []
    for (arm, lr), group in sorted(groups.items(), key=lambda kv: (ROW_ORDER.index(kv[0][0]), kv[0][1] or 0)):
        row: dict = {"arm": arm, "lr": lr, "seeds": sorted(r["seed"] for r in group if r["seed"] is not None)}
        for lang in (ORIGINAL, NEW):
            for metric in METRICS:
                values = [r["eval"][lang][metric] for r in group if r["eval"][lang][metric] is not None]
                if values:
                    row[f"{metric}_{lang}"] = {
                        "mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "values": values,
                    }
        rows.append(row)
    return rows


def _cell(row: dict, key: str, percent: bool) -> str:
    if key not in row:
        return "–"
    mean, std = row[key]["mean"], row[key]["std"]
    if percent:
        return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(row[key]["values"]) > 1 else f"{100 * mean:.1f}"
    return f"{mean:.2f} ± {std:.2f}" if len(row[key]["values"]) > 1 else f"{mean:.2f}"


def table(
    rows: Sequence[dict], arms: Sequence[str] | None = None, lrs: dict[str, float] | None = None
) -> str:
    """Markdown table of ``rows`` (optionally only ``arms``, and per arm family only the lr in ``lrs``)."""
    header = (
        "| arm | lr | ppl en ↓ | ppl es ↓ | task en % ↑ | task es % ↑ | format en % | format es % "
        "| expert 0 en % | expert 0 es % |"
    )
    lines = [header, "|" + " --- |" * 10]
    for row in rows:
        if arms is not None and row["arm"] not in arms:
            continue
        if lrs is not None and row["lr"] is not None and lrs.get(row["arm"], row["lr"]) != row["lr"]:
            continue
        lr = "–" if row["lr"] is None else f"{row['lr']:g}"
        cells = [
            _cell(row, "ppl_en", False),
            _cell(row, "ppl_es", False),
            _cell(row, "exact_en", True),
            _cell(row, "exact_es", True),
            _cell(row, "format_en", True),
            _cell(row, "format_es", True),
            _cell(row, "expert0_en", True),
            _cell(row, "expert0_es", True),
        ]
        lines.append(f"| {row['arm']} | {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
