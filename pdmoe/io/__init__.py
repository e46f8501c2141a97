"""Checkpoint I/O kept apart from the math.

``safetensors_format`` (the file format), ``reader`` (lazy, validated reading), ``writer`` (planned,
streaming shards), ``background`` (a writer thread), ``atomic`` (nothing half-written under a final
name), ``outputs`` (output folders), ``side_files`` (tokenizer and generation files).
"""

from pdmoe.io.outputs import prepare_output_dir
from pdmoe.io.reader import CheckpointReader
from pdmoe.io.safetensors_format import TensorMeta
from pdmoe.io.writer import CheckpointWriter, plan_shards

__all__ = ["CheckpointReader", "CheckpointWriter", "TensorMeta", "plan_shards", "prepare_output_dir"]
