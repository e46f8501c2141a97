"""Continued pre-training of an upcycled MoE (METHOD.md steps 2 and 3) and its evaluation.

``train(TrainConfig(...))`` is ``pdmoe cpt``; ``evaluate_model`` is ``pdmoe eval``.
"""

from __future__ import annotations

from pdmoe.errors import DataError

from .data import CorpusSpec, corpus_spec
from .evaluate import EvalResult, evaluate_model
from .freezing import PARTS, apply_trainable, trainable_parts
from .losses import language_prior_loss
from .trainer import TrainConfig, train

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
