"""Checkpoint I/O kept apart from the math.

``safetensors_format`` (the file format), ``reader`` (lazy, validated reading), ``writer`` (planned,
streaming shards), ``background`` (a writer thread), ``atomic`` (nothing half-written under a final
name), ``outputs`` (the guard, lock and marker of output folders), ``side_files`` (tokenizer and
generation files), ``strict_json`` and ``model_config`` (config files read strictly and checked
against the tensors), ``hf_loading`` (transformers loads that run no checkpoint code).
"""

from pdmoe.io.outputs import Command, OutputFolder, claim_output
from pdmoe.io.reader import CheckpointReader
from pdmoe.io.safetensors_format import TensorMeta
from pdmoe.io.writer import CheckpointWriter, plan_shards

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "Command",
    "OutputFolder",
    "TensorMeta",
    "claim_output",
    "plan_shards",
]
