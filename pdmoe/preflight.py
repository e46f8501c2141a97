"""A command's paths checked before torch, transformers and accelerate load.

Importing those takes seconds (3-30 s on a busy machine); a mistyped path, a folder that is not a
checkpoint, a dense model where an MoE is needed or an ``--out`` that cannot be used is reported
in a fraction of a second instead, because every command runs these checks first and imports its
heavy modules only after them. What is checked here is checked again, fully, where it is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pdmoe.hub import resolve_model
from pdmoe.io.model_config import read_config, require_moe


def check_models(models: Sequence[str | Path], *, moe: bool = False) -> list[Path]:
    """The local folders of ``models`` (hub ids resolved), each with a readable ``config.json``
    without remote code, an upcycled MoE's when ``moe``. (``--out`` is ``outputs.check_output``'s.)"""
    folders = [resolve_model(model) for model in models]
    for folder in folders:
        config = read_config(folder)
        if moe:
            require_moe(config, folder)
    return folders
