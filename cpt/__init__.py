"""Continued pre-training of an upcycled MoE (docs/method.md steps 2 and 3) and its evaluation.

``train(TrainConfig(...))`` is ``pdmoe cpt``; ``evaluate_model`` is ``pdmoe eval``. The names
below load on first access, so the command line parses ``pdmoe cpt`` / ``pdmoe eval`` options
(``settings``) before torch, transformers and accelerate load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdmoe.errors import DataError

    from .data import CorpusSpec, corpus_spec
    from .evaluate import EvalResult, evaluate_model
    from .freezing import apply_trainable, trainable_parts
    from .losses import language_prior_loss
    from .settings import PARTS, TrainConfig
    from .trainer import train

_LAZY = {
    "PARTS": "pdmoe.cpt.settings",
    "CorpusSpec": "pdmoe.cpt.data",
    "DataError": "pdmoe.errors",
    "EvalResult": "pdmoe.cpt.evaluate",
    "TrainConfig": "pdmoe.cpt.settings",
    "apply_trainable": "pdmoe.cpt.freezing",
    "corpus_spec": "pdmoe.cpt.data",
    "evaluate_model": "pdmoe.cpt.evaluate",
    "language_prior_loss": "pdmoe.cpt.losses",
    "train": "pdmoe.cpt.trainer",
    "trainable_parts": "pdmoe.cpt.freezing",
}
__all__ = [
    "PARTS",
    "CorpusSpec",
    "DataError",
    "EvalResult",
    "TrainConfig",
    "apply_trainable",
    "corpus_spec",
    "evaluate_model",
    "language_prior_loss",
    "train",
    "trainable_parts",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pdmoe.cpt' has no attribute {name!r}")
