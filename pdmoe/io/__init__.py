"""Checkpoint I/O kept apart from the math.

``safetensors_format`` (the file format), ``reader`` (lazy, validated reading), ``writer`` (planned,
streaming shards), ``background`` (a writer thread), ``streaming`` (the steps of a streamed
checkpoint output that upcycle, graft and export share), ``atomic`` (nothing half-written under a
final name), ``outputs`` (the guard, lock and marker of output folders), ``side_files`` (tokenizer
and generation files), ``strict_json`` and ``model_config`` (config files read strictly and
checked against the tensors), ``hf_loading`` (transformers loads that run no checkpoint code).

The names below load on first access: ``outputs``, ``model_config`` and ``strict_json`` need no
torch, so the command line checks paths with them before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdmoe.io.outputs import Command, OutputFolder, claim_output
    from pdmoe.io.reader import CheckpointReader
    from pdmoe.io.safetensors_format import TensorMeta
    from pdmoe.io.writer import CheckpointWriter, plan_shards

_LAZY = {
    "CheckpointReader": "pdmoe.io.reader",
    "CheckpointWriter": "pdmoe.io.writer",
    "Command": "pdmoe.io.outputs",
    "OutputFolder": "pdmoe.io.outputs",
    "TensorMeta": "pdmoe.io.safetensors_format",
    "claim_output": "pdmoe.io.outputs",
    "plan_shards": "pdmoe.io.writer",
}
__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "Command",
    "OutputFolder",
    "TensorMeta",
    "claim_output",
    "plan_shards",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pdmoe.io' has no attribute {name!r}")
