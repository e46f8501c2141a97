"""The trade-off curves: every arm family across the learning-rate sweep, mean ± std over seeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .arms import Arm

STYLE = {
    Arm.DENSE_CPT.value: ("tab:blue", "o", ":"),
    Arm.DENSE_PARAM_DELTA.value: ("tab:blue", "o", "-"),
    Arm.DENSE_TIES.value: ("tab:cyan", "v", "-"),
    Arm.DENSE_DARE.value: ("tab:purple", "^", "-"),
    Arm.MOE_CPT.value: ("tab:orange", "s", ":"),
    Arm.DELTA_MOE.value: ("tab:orange", "s", "-"),
    Arm.MOE_REVIEW.value: ("tab:red", "D", ":"),
    Arm.DELTA_MOE_REVIEW.value: ("tab:red", "D", "-"),
    Arm.MATCHED_CPT.value: ("tab:green", "P", ":"),
    Arm.MATCHED_PARAM_DELTA.value: ("tab:green", "P", "-"),
    Arm.BASE.value: ("black", "*", ""),
    Arm.INSTRUCT.value: ("dimgray", "X", ""),
}
PANELS = (
    (
        "ppl_es",
        "ppl_en",
        "held-out perplexity, Spanish (new) ↓",
        "held-out perplexity, English (original) ↓",
        True,
    ),
    (
        "exact_es",
        "exact_en",
        "task exact match, Spanish (new) ↑",
        "task exact match, English (original) ↑",
        False,
    ),
)


def plot(rows: Sequence[dict], path: Path, title: str) -> bool:
    """Write the two panels (perplexities, task) to ``path``; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, (x_key, y_key, x_label, y_label, log) in zip(axes, PANELS, strict=True):
        for arm, (color, marker, line) in STYLE.items():
            points = sorted((r for r in rows if r["arm"] == arm and x_key in r), key=lambda r: r["lr"] or 0)
            if not points:
                continue
            xs = [r[x_key]["mean"] for r in points]
            ys = [r[y_key]["mean"] for r in points]
            ax.errorbar(
                xs,
                ys,
                xerr=[r[x_key]["std"] for r in points],
                yerr=[r[y_key]["std"] for r in points],
                color=color,
                marker=marker,
                linestyle=line or "none",
                markersize=9 if not line else 5,
                capsize=2,
                label=arm,
            )
            if line and len(points) > 1:
                for r, x, y in zip(points, xs, ys, strict=True):
                    ax.annotate(f"{r['lr']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
