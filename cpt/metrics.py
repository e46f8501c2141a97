"""``metrics.jsonl``: the sums of one logging interval, reduced over processes into one JSON line
(losses, learning rate, gradient norm, tokens, and each MoE layer's expert load per language)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from pdmoe.errors import CheckpointError
from pdmoe.io.atomic import open_to_append
from pdmoe.io.outputs import RESUME, Command

from .data import CorpusSpec
from .evaluate import shares_by_language
from .losses import Losses
from .training_checkpoint import TrainerState

METRICS_FILE = "metrics.jsonl"


class Interval:
    """Sums of one logging interval, reduced over processes when logged."""

    def __init__(self, counts_shape: tuple[int, ...], device: torch.device) -> None:
        self.losses = Losses.zeros(device)
        self.counts = torch.zeros(counts_shape, dtype=torch.int64, device=device)
        self.steps = 0
        self.tokens = 0
        self.start = time.perf_counter()


def interval_record(
    accelerator: Accelerator,
    interval: Interval,
    state: TrainerState,
    lr: float,
    grad_norm: torch.Tensor,
    corpus: CorpusSpec,
    moe_layers: list[int],
) -> dict[str, Any]:
    """The line of ``interval``: its mean losses over steps and processes, then where the run is."""
    losses = accelerator.reduce(interval.losses, "mean") / interval.steps
    counts = accelerator.reduce(interval.counts, "sum").cpu()
    elapsed = time.perf_counter() - interval.start
    record: dict[str, Any] = Losses.named(losses)
    record.update(
        step=state.step,
        lr=lr,
        grad_norm=float(grad_norm),
        tokens_seen=state.tokens_seen,
        tokens_per_s=interval.tokens / max(elapsed, 1e-9),
        expert_load=shares_by_language(counts, corpus.languages, moe_layers),
    )
    return record


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """One more line of ``metrics.jsonl``; a failed write is a ``CheckpointError`` saying what to do."""
    try:
        with open_to_append(path) as handle:
            handle.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")
    except OSError as error:
        raise CheckpointError(
            "cannot append to {path} ({reason}); free space and rerun with {resume}",
            path=path,
            reason=error.strerror or error,
            resume=RESUME[Command.CPT],
        ) from None


def _finite_or_null(value: Any) -> Any:
    """Non-finite floats (a diverged eval perplexity) as null: every line stays valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value
