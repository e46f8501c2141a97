"""Files of a training run: the input MoE, resumable training checkpoints, the final HF checkpoint.

A training checkpoint is ``OUT/checkpoints/step-NNNNNNNN/``: accelerate's ``save_state`` (model,
optimizer, registered scheduler, every process's RNG state) plus ``trainer_state.json`` (step, data
position, the run's settings). It is written into a hidden ``.partial`` directory and renamed when
complete, so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from pdmoe.errors import CheckpointError, UsageError
from pdmoe.io.atomic import Staged, write_json, write_text_atomic
from pdmoe.io.hf_loading import load_causal_lm
from pdmoe.io.hf_loading import load_tokenizer as load_tokenizer  # the trainer imports it from here
from pdmoe.io.reader import CheckpointReader
from pdmoe.io.side_files import copy_side_files
from pdmoe.modeling import MoEForCausalLM
from pdmoe.options import DTYPES

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STEP_PREFIX = "step-"


def read_moe_config(model_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an upcycled MoE, checked against its tensors (safetensors headers read
    strictly, pickles and remote code refused), or an error saying what the directory is instead."""
    with CheckpointReader(model_dir) as reader:
        config = reader.config
        if config.get("model_type") != "pdmoe":
            raise UsageError(
                f"{model_dir} is a dense {config.get('model_type')!r} model, not an upcycled MoE; "
                f"run `pdmoe upcycle --model {model_dir} --out MOE_DIR` first and train MOE_DIR"
            )
        reader.check_config()
    return config


def load_moe_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> MoEForCausalLM:
    read_moe_config(model_dir)
    return load_causal_lm(model_dir, MoEForCausalLM, dtype=dtype)


def checkpoint_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype the input checkpoint was saved in (the final checkpoint is saved the same way)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise CheckpointError(f"config.json names dtype {name!r}; pdmoe checkpoints are {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class TrainerState:
    """Where a run is: optimizer steps done, sequences consumed, and the settings it runs with."""

    step: int = 0
    position: int = 0
    tokens_seen: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = Path(out_dir) / CHECKPOINTS
    steps = sorted(root.glob(f"{_STEP_PREFIX}*")) if root.is_dir() else []
    return steps[-1] if steps else None


def save_training_checkpoint(accelerator: Accelerator, out_dir: Path, state: TrainerState, keep: int) -> Path:
    """Atomically write a resumable checkpoint (all processes call this), keeping the newest ``keep``."""
    root = Path(out_dir) / CHECKPOINTS
    staged = Staged(root / f"{_STEP_PREFIX}{state.step:08d}")
    if accelerator.is_main_process:
        staged.abort()
        staged.path.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staged.path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(staged.path / TRAINER_STATE, asdict(state))
        shutil.rmtree(staged.final, ignore_errors=True)  # the same step saved by a run since resumed
        staged.commit()
        for old in sorted(root.glob(f"{_STEP_PREFIX}*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return staged.final


def read_trainer_state(checkpoint: Path, settings: dict[str, Any]) -> TrainerState:
    """The state of ``checkpoint``, refused when it was written with other settings than ``settings``."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint} is not a training checkpoint (no {TRAINER_STATE}); pass a step-* directory"
        )
    state = TrainerState(**json.loads(path.read_text()))
    differences = [
        f"{key}: checkpoint {state.settings.get(key)!r}, this run {value!r}"
        for key, value in settings.items()
        if state.settings.get(key) != value
    ]
    if differences:
        raise UsageError(
            f"--resume {checkpoint} does not match this run's settings ({'; '.join(differences)}); "
            "rerun with the original settings, or start a fresh run in a new --out"
        )
    return state


def save_final_model(
    accelerator: Accelerator, model: torch.nn.Module, model_dir: Path, out_dir: Path, dtype: torch.dtype
) -> None:
    """Save the trained MoE in METHOD.md's format (fused expert tensors) into ``out_dir``.

    Every process joins the state-dict gather (FSDP); the main process writes a hidden directory
    and moves its files into ``out_dir`` with ``config.json`` last, so a finished-looking
    checkpoint is a finished one. Tensors are cast back to the input's dtype: frozen ones come back
    bit-identical (the float32 training copy holds them exactly).
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        staged = Staged(Path(out_dir) / "final")
        staged.abort()
        unwrapped.config.dtype = dtype
        unwrapped.save_pretrained(staged.path, state_dict=state_dict)
        copy_side_files(Path(model_dir), staged.path)
        staged.commit_files_into(Path(out_dir), last="config.json")
    accelerator.wait_for_everyone()


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop metric lines of steps after ``after_step`` (written by a run that was then killed)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line).get("step", 0) <= after_step
    ]
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))
