"""Checkpoint I/O kept apart from the math: a lazy safetensors reader and a streaming shard writer."""

from pdmoe.io.reader import CheckpointReader
from pdmoe.io.safetensors_format import TensorMeta
from pdmoe.io.writer import CheckpointWriter, plan_shards, prepare_output_dir

__all__ = ["CheckpointReader", "CheckpointWriter", "TensorMeta", "plan_shards", "prepare_output_dir"]
