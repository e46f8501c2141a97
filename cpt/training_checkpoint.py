"""Resumable training checkpoints, in safetensors and JSON only: a checkpoint folder holds data and
never code, so resuming from one cannot run anything planted in it.

``OUT/checkpoints/step-NNNNNNNN/``:

* ``trainer_state.json``: pdmoe's marker (``format``, ``version``), where the run is (step, data
  position, tokens seen), the settings it runs with (``check_settings``), the schedule's state, the optimizer's
  hyper-parameters, whether the tensors are sharded, and the byte size of every tensor file;
* ``rank-RRRRR.safetensors``, one per process: its random-number generator states and, when the
  weights are sharded (FSDP2), its shards of the trainable parameters and of their optimizer
  state; when they are replicated (one process, DDP) process 0's file alone holds them in full.

Only these files are read, through the safetensors library; anything else in the folder (e.g.
pickles named as accelerate names its state) is ignored. The folder is written hidden and renamed
when every process has written its part, so a run that dies or runs out of space mid-save leaves the
previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from pdmoe.errors import CheckpointError, Option, Problem, UsageError
from pdmoe.io.atomic import Staged, write_json
from pdmoe.io.outputs import RESUME, Command

from .collective import together
from .settings import fixed_defaults, free_options

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
FORMAT = "pdmoe-cpt-checkpoint"
VERSION = 1
_STEP_PREFIX = "step-"
_PARAM = "param/"
_OPTIMIZER = "optimizer/"
_RNG = "rng/"


@dataclass
class TrainerState:
    """Where a run is: optimizer steps done, sequences consumed, and the settings it runs with."""

    step: int = 0
    position: int = 0
    tokens_seen: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointRecord:
    """The contents of ``trainer_state.json``, checked field by field when read."""

    state: TrainerState
    scheduler: dict[str, Any]
    param_groups: list[dict[str, Any]]
    sharded: bool
    files: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "step": self.state.step,
            "position": self.state.position,
            "tokens_seen": self.state.tokens_seen,
            "settings": self.state.settings,
            "scheduler": self.scheduler,
            "param_groups": self.param_groups,
            "sharded": self.sharded,
            "files": self.files,
        }


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = Path(out_dir) / CHECKPOINTS
    steps = sorted(path for path in root.glob(f"{_STEP_PREFIX}*") if path.is_dir()) if root.is_dir() else []
    return steps[-1] if steps else None


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by name (names of the unwrapped model: the same under every strategy)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def is_sharded(params: dict[str, torch.nn.Parameter]) -> bool:
    return any(isinstance(p, DTensor) for p in params.values())


def save_training_checkpoint(
    accelerator: Accelerator,
    out_dir: Path,
    state: TrainerState,
    keep: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Path:
    """Write a resumable checkpoint (every process calls this), keeping the newest ``keep`` (0: all).

    Raises ``CheckpointError`` on every process when any of them cannot write its part (a full
    disk, say): the partial folder is removed and the previous checkpoint stays the latest.
    """
    root = Path(out_dir) / CHECKPOINTS
    staged = Staged(root / f"{_STEP_PREFIX}{state.step:08d}")
    params = trainable_parameters(accelerator.unwrap_model(model))
    sharded = is_sharded(params)

    def make_folder() -> None:
        staged.abort()
        staged.path.mkdir(parents=True)

    def write_own_part() -> None:
        with_weights = sharded or accelerator.is_main_process
        tensors, metadata = _process_tensors(params, optimizer, accelerator.device, with_weights)
        path = staged.path / rank_file(accelerator.process_index)
        save_file(tensors, path, metadata=metadata)
        _fsync(path)

    def commit() -> None:
        record = CheckpointRecord(
            state=state,
            scheduler=scheduler.state_dict(),
            param_groups=_param_groups(optimizer, params),
            sharded=sharded,
            files={
                rank_file(rank): (staged.path / rank_file(rank)).stat().st_size
                for rank in range(accelerator.num_processes)
            },
        )
        write_json(staged.path / TRAINER_STATE, record.to_json())
        shutil.rmtree(staged.final, ignore_errors=True)  # the same step saved by a run since resumed
        staged.commit()

    elsewhere = OSError("another process could not write its part")
    try:
        together(accelerator, make_folder, main_only=True, elsewhere=elsewhere)
        together(accelerator, write_own_part, elsewhere=elsewhere)
        together(accelerator, commit, main_only=True, elsewhere=elsewhere)
    except OSError as error:
        if accelerator.is_main_process:
            staged.abort()
        previous = latest_checkpoint(out_dir)
        raise CheckpointError(
            "cannot write the training checkpoint {checkpoint} ({reason}); "
            "the previous checkpoint ({previous}) is kept: free space and rerun with {resume}",
            checkpoint=staged.final,
            reason=_reason(error),
            previous=previous or "none yet",
            resume=RESUME[Command.CPT],
        ) from None
    if accelerator.is_main_process and keep > 0:
        for old in sorted(root.glob(f"{_STEP_PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return staged.final


def read_checkpoint_record(checkpoint: Path) -> CheckpointRecord:
    """``trainer_state.json`` of a folder pdmoe wrote, or a ``CheckpointError`` saying what it is instead."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint} is not a training checkpoint of pdmoe (no {TRAINER_STATE}); "
            "pass a checkpoints/step-* directory of this run, or 'latest'"
        )
    try:
        payload = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path} is corrupt ({error}); resume from an earlier checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{checkpoint} is not a training checkpoint of pdmoe ({TRAINER_STATE} lacks its marker); "
            "pass a checkpoints/step-* directory of this run, or 'latest'"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{checkpoint} is a version {payload.get('version')!r} checkpoint; this pdmoe reads version {VERSION}"
        )
    expected = {
        "step": int,
        "position": int,
        "tokens_seen": int,
        "settings": dict,
        "scheduler": dict,
        "param_groups": list,
        "sharded": bool,
        "files": dict,
    }
    wrong = [key for key, kind in expected.items() if not _is_a(payload.get(key), kind)]
    files = payload.get("files") or {}
    if wrong or not all(isinstance(size, int) and not isinstance(size, bool) for size in files.values()):
        raise CheckpointError(
            f"{path} is corrupt (bad or missing {', '.join(wrong) or 'files'}); resume from an earlier checkpoint"
        )
    state = TrainerState(payload["step"], payload["position"], payload["tokens_seen"], payload["settings"])
    return CheckpointRecord(state, payload["scheduler"], payload["param_groups"], payload["sharded"], files)


def check_settings(checkpoint: Path, record: CheckpointRecord, settings: dict[str, Any]) -> None:
    """Refuse a checkpoint written with other settings than this run's.

    A setting the checkpoint lacks is an option added since it was written: it ran with that
    option's default, so this run matches it when it keeps the default. A setting this pdmoe does
    not know is an option of a newer pdmoe, which it cannot honour."""
    saved, defaults = record.state.settings, fixed_defaults()
    differences = [
        _difference(key, saved, value, defaults)
        for key, value in settings.items()
        if saved.get(key, defaults.get(key, _ABSENT)) != value
    ]
    unknown = sorted(saved.keys() - settings.keys() - free_options())
    differences += [f"{key}: checkpoint {saved[key]!r}, unknown to this pdmoe" for key in unknown]
    if differences:
        raise UsageError(
            "{resume} {checkpoint} does not match this run's settings ({differences}); "
            "rerun with the original settings, or start a fresh run in a new {out}",
            problem=Problem.CONFLICT,
            resume=Option("resume"),
            checkpoint=checkpoint,
            differences="; ".join(differences),
            out=Option("out"),
        )


_ABSENT = object()


def _difference(key: str, saved: dict[str, Any], value: Any, defaults: dict[str, Any]) -> str:
    if key in saved:
        return f"{key}: checkpoint {saved[key]!r}, this run {value!r}"
    if key in defaults:
        return f"{key}: checkpoint from before the option, so {defaults[key]!r}, this run {value!r}"
    return f"{key}: checkpoint None, this run {value!r}"


def load_training_checkpoint(
    accelerator: Accelerator,
    checkpoint: Path,
    record: CheckpointRecord,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Restore trainable weights, optimizer, schedule and RNG states (every process calls this).

    A missing, truncated or inconsistent file raises ``CheckpointError`` on every process."""
    params = trainable_parameters(accelerator.unwrap_model(model))

    def load() -> None:
        if record.sharded != is_sharded(params):
            raise CheckpointError(
                f"{checkpoint} holds {'sharded' if record.sharded else 'full'} weights but this run's are "
                f"{'sharded' if is_sharded(params) else 'full'}; resume with the distributed set-up it was written with"
            )
        rank = accelerator.process_index
        own = _read_tensors(checkpoint, record, rank)
        weights = own if record.sharded or rank == 0 else _read_tensors(checkpoint, record, 0)
        _load_weights(checkpoint, params, weights)
        _load_optimizer(checkpoint, optimizer, params, weights, record.param_groups)
        _load_scheduler(checkpoint, scheduler, record.scheduler)
        _set_rng_states(checkpoint, own, accelerator.device)

    elsewhere = CheckpointError(f"another process could not read its part of {checkpoint}; see its error")
    together(accelerator, load, elsewhere=elsewhere)


def _process_tensors(
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    with_weights: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's tensors (local shards of sharded ones) and its RNG states."""
    tensors, metadata = _rng_states(device)
    if with_weights:
        for name, param in params.items():
            tensors[_PARAM + name] = _local(param)
            for key, value in optimizer.state.get(param, {}).items():
                tensors[f"{_OPTIMIZER}{name}/{key}"] = _local(value)
    return tensors, metadata


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of this process's part of ``tensor``."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.detach().to("cpu", copy=True).contiguous()


def _param_groups(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]
) -> list[dict[str, Any]]:
    """The optimizer's hyper-parameters, with each group's parameters by name."""
    names = {id(p): name for name, p in params.items()}
    return [
        {
            **{k: v for k, v in group.items() if k != "params"},
            "params": [names[id(p)] for p in group["params"]],
        }
        for group in optimizer.param_groups
    ]


def _read_tensors(checkpoint: Path, record: CheckpointRecord, rank: int) -> dict[str, Any]:
    """Every tensor of ``rank``'s file, plus its metadata under the key ``None``."""
    name = rank_file(rank)
    path = Path(checkpoint) / name
    if name not in record.files:
        raise CheckpointError(
            f"{checkpoint} was written by {len(record.files)} processes and has no part for process {rank}"
        )
    size = path.stat().st_size if path.is_file() else None
    if size != record.files[name]:
        found = "is missing" if size is None else f"has {size} bytes, not {record.files[name]}"
        raise CheckpointError(f"{path} {found} (truncated or replaced); resume from an earlier checkpoint")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            tensors: dict[str, Any] = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            tensors[None] = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt ({error}); resume from an earlier checkpoint") from None
    return tensors


def _load_weights(checkpoint: Path, params: dict[str, torch.nn.Parameter], tensors: dict[str, Any]) -> None:
    for name, param in params.items():
        target = param.to_local() if isinstance(param, DTensor) else param
        saved = _expect(checkpoint, tensors, _PARAM + name, target.shape)
        with torch.no_grad():
            target.copy_(saved)


def _load_optimizer(
    checkpoint: Path,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    tensors: dict[str, Any],
    saved_groups: list[dict[str, Any]],
) -> None:
    """Rebuild the optimizer's state dict from the saved tensors (sharded ones as DTensors laid out
    like their parameter) and hand it to the optimizer, which places and casts it."""
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    names = {id(p): name for name, p in params.items()}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for param_id, position in index.items():
        name, param = names[param_id], params[names[param_id]]
        prefix = f"{_OPTIMIZER}{name}/"
        entries = {
            key[len(prefix) :]: value
            for key, value in tensors.items()
            if isinstance(key, str) and key.startswith(prefix)
        }
        if isinstance(param, DTensor):
            entries = {key: _like(param, value) for key, value in entries.items()}
        if entries:
            state[position] = entries
    current = optimizer.state_dict()["param_groups"]
    if [group["params"] for group in saved_groups] != [
        [names[id(p)] for p in g["params"]] for g in optimizer.param_groups
    ]:
        raise CheckpointError(
            f"{checkpoint} was written for other trainable parameters; resume with the run's settings"
        )
    groups = [
        {**{k: _as(current_group.get(k), v) for k, v in saved.items()}, "params": current_group["params"]}
        for saved, current_group in zip(saved_groups, current, strict=True)
    ]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{checkpoint} has an unusable optimizer state ({error})") from None


def _load_scheduler(
    checkpoint: Path, scheduler: torch.optim.lr_scheduler.LRScheduler, saved: dict[str, Any]
) -> None:
    if saved.keys() != scheduler.state_dict().keys():
        raise CheckpointError(f"{checkpoint} has an unusable schedule state (fields {sorted(saved)})")
    scheduler.load_state_dict(saved)


def _like(param: DTensor, local: torch.Tensor) -> torch.Tensor:
    """A saved local shard of a per-parameter state tensor as a DTensor laid out like ``param``."""
    if local.dim() == 0 or tuple(local.shape) != tuple(param.to_local().shape):
        return local
    return DTensor.from_local(
        local.to(param.device), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )


def _as(current: Any, saved: Any) -> Any:
    """A JSON value back in the type the optimizer uses (tuples come back from JSON as lists)."""
    return tuple(saved) if isinstance(current, tuple) and isinstance(saved, list) else saved


def _expect(checkpoint: Path, tensors: dict[str, Any], key: str, shape: torch.Size) -> torch.Tensor:
    saved = tensors.get(key)
    if saved is None or tuple(saved.shape) != tuple(shape):
        found = "missing" if saved is None else f"shaped {tuple(saved.shape)}, not {tuple(shape)}"
        raise CheckpointError(f"{checkpoint}: {key} is {found}; resume with the run's model and settings")
    return saved


def _rng_states(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's generators: torch's (CPU and the accelerator's), Python's and NumPy's."""
    tensors = {f"{_RNG}torch": torch.get_rng_state()}
    if device.type != "cpu":
        tensors[f"{_RNG}{device.type}"] = torch.get_device_module(device).get_rng_state(device)
    version, python_state, gauss = random.getstate()
    tensors[f"{_RNG}python"] = torch.tensor(python_state, dtype=torch.int64)
    kind, numpy_state, numpy_pos, has_gauss, cached = np.random.get_state()
    tensors[f"{_RNG}numpy"] = torch.from_numpy(numpy_state.astype(np.int64))
    metadata = {
        "python_random": json.dumps([version, gauss]),
        "numpy_random": json.dumps([kind, int(numpy_pos), int(has_gauss), float(cached)]),
    }
    return tensors, metadata


def _set_rng_states(checkpoint: Path, tensors: dict[str, Any], device: torch.device) -> None:
    metadata = tensors[None]
    try:
        version, gauss = json.loads(metadata["python_random"])
        kind, numpy_pos, has_gauss, cached = json.loads(metadata["numpy_random"])
        torch.set_rng_state(tensors[f"{_RNG}torch"])
        if device.type != "cpu":
            torch.get_device_module(device).set_rng_state(tensors[f"{_RNG}{device.type}"], device)
        random.setstate((version, tuple(tensors[f"{_RNG}python"].tolist()), gauss))
        numpy_state = tensors[f"{_RNG}numpy"].numpy().astype(np.uint32)
        np.random.set_state((kind, numpy_state, numpy_pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{checkpoint} has unusable random-number generator states ({error!r})"
        ) from None


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _is_a(value: Any, kind: type) -> bool:
    return (
        isinstance(value, kind)
        and (kind is bool or not isinstance(value, bool))
        and (kind is not int or value >= 0)
    )
