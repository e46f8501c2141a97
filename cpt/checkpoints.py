"""Files of a training run: the input MoE, the final HF checkpoint and the metrics log.

Resumable training checkpoints are ``training_checkpoint``'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from pdmoe.errors import CheckpointError
from pdmoe.experts import fuse_split_experts
from pdmoe.io.atomic import Staged, write_text_atomic
from pdmoe.io.hf_loading import load_causal_lm
from pdmoe.io.hf_loading import load_tokenizer as load_tokenizer  # the trainer imports it from here
from pdmoe.io.model_config import read_config, require_moe
from pdmoe.io.outputs import RESUME, Command
from pdmoe.io.reader import CheckpointReader
from pdmoe.io.side_files import copy_side_files
from pdmoe.layout import FROZEN_PREFIX
from pdmoe.modeling import MoEForCausalLM
from pdmoe.options import DTYPE_NAMES, parse_dtype

from .collective import together


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint, checked against its tensors (safetensors headers read
    strictly, pickles and remote code refused)."""
    with CheckpointReader(model_dir) as reader:
        return reader.check_config()


def read_moe_config(model_dir: str | Path) -> dict[str, Any]:
    """``read_model_config`` of an upcycled MoE, or an error saying what the directory is instead."""
    with CheckpointReader(model_dir) as reader:
        require_moe(reader.config, model_dir)
        return reader.check_config()


def read_moe_config_only(model_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an upcycled MoE, without looking at its tensors (a memory plan needs
    no weights: the folder may hold config.json alone)."""
    config = read_config(model_dir)
    require_moe(config, model_dir)
    return config


def load_moe_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> MoEForCausalLM:
    read_moe_config(model_dir)
    return load_causal_lm(model_dir, MoEForCausalLM, dtype=dtype)


def checkpoint_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype the input checkpoint was saved in (the final checkpoint is saved the same way)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPE_NAMES:
        raise CheckpointError(
            f"config.json names dtype {name!r}; pdmoe checkpoints are {', '.join(DTYPE_NAMES)}"
        )
    return parse_dtype(name)


def save_final_model(
    accelerator: Accelerator, model: torch.nn.Module, model_dir: Path, out_dir: Path, dtype: torch.dtype
) -> None:
    """Save the trained MoE in docs/method.md's format (fused expert tensors) into ``out_dir``.

    Every process joins the state-dict gather (FSDP); the main process writes a hidden directory
    and moves its files into ``out_dir`` with ``config.json`` last, so a finished-looking
    checkpoint is a finished one. Tensors are cast back to the input's dtype: frozen ones come back
    bit-identical (a float32 training copy holds them exactly; frozen weights held in a narrower
    compute dtype are read back from the input). A failed write (a full disk) raises
    ``CheckpointError`` on every process and leaves no model files in ``out_dir``.
    """
    state_dict = accelerator.get_state_dict(model)
    staged = Staged(Path(out_dir) / "final")

    def write() -> None:
        unwrapped = accelerator.unwrap_model(model)
        tensors = fuse_split_experts(unwrapped, dict(state_dict))
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        _restore_narrowed_frozen(unwrapped, Path(model_dir), tensors, dtype)
        staged.abort()
        unwrapped.config.dtype = dtype
        try:
            unwrapped.save_pretrained(staged.path, state_dict=tensors)
            copy_side_files(Path(model_dir), staged.path)
            staged.commit_files_into(Path(out_dir), last="config.json")
        except BaseException:
            staged.abort()
            raise

    try:
        together(accelerator, write, main_only=True, elsewhere=OSError("the main process could not write it"))
    except OSError as error:
        raise CheckpointError(
            "cannot write the final model into {out_dir} ({reason}); "
            "the training checkpoints are kept: free space and rerun with {resume}",
            out_dir=out_dir,
            reason=error.strerror or error,
            resume=RESUME[Command.CPT],
        ) from None


def _restore_narrowed_frozen(
    model: torch.nn.Module, model_dir: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Frozen weights the run held in a dtype narrower than the checkpoint's (bf16 copies of a
    float32 checkpoint under sharded mixed precision) did not change: copy them from the input.
    A tied weight gets one tensor under each of its names, as it had in the model."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad and param.dtype.itemsize < dtype.itemsize:
            names.setdefault(id(param), []).append(name)
    if not names:
        return
    with CheckpointReader(model_dir) as reader:
        for aliases in names.values():
            prefix, _, attribute = aliases[0].rpartition(".")
            if attribute.startswith(FROZEN_PREFIX):  # the leading experts of a fused tensor
                key = f"{prefix}.{attribute.removeprefix(FROZEN_PREFIX)}"
                rows = tensors[key][: model.get_submodule(prefix).num_frozen]
                rows.copy_(reader.read_elements(key, 0, rows.numel()).view(rows.shape))
                continue
            stored = next((name for name in aliases if name in reader), None)
            if stored is None:  # not in the input (initialised when loaded): the training copy stays
                continue
            original = reader.get(stored)
            for name in aliases:
                if name in tensors:
                    tensors[name] = original


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop metric lines of steps after ``after_step`` (written by a run that was then killed), and a
    line cut short by the kill."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(errors="replace").splitlines() if _step_of(line) <= after_step]
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def _step_of(line: str) -> float:
    """The step of a metrics line; infinity for a line that is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else math.inf
