"""The training loop of CPT and of the review stage, on one process or many through accelerate.

Distribution (DDP, FSDP), mixed precision and device placement come from accelerate and the
user's ``accelerate config``; this module only decides which sequences each process sees (the
same global batches whatever the number of processes, see ``data.micro_batch_slice``), the loss,
the schedule, checkpoints and metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from pdmoe.config import MoEConfig
from pdmoe.errors import (
    CheckpointError,
    Option,
    Problem,
    Spelling,
    TrainingError,
    UsageError,
    keyword_spelling,
)
from pdmoe.experts import StateDictLayout
from pdmoe.hub import resolve_model
from pdmoe.io.outputs import OVERWRITE, RESUME, Command, OutputFolder, check_output, claim_output
from pdmoe.options import parse_size

from .checkpoints import (
    checkpoint_dtype,
    load_moe_model,
    load_tokenizer,
    read_moe_config,
    read_moe_config_only,
    save_final_model,
    truncate_metrics,
)
from .collective import together
from .data import (
    CorpusSpec,
    PackedSequences,
    SequenceOrder,
    TokenCache,
    corpus_spec,
    micro_batch_slice,
)
from .evaluate import EvalResult, evaluation_sums, expert_token_counts, spread_indices
from .freezing import Part, Stage, apply_trainable, count_parameters, parse_stage, trainable_parts
from .losses import Losses, language_prior_loss
from .memory_plan import (
    DEFAULT_GPU_MEMORY,
    GB,
    MAX_PROCESSES,
    RunShape,
    check_fits,
    describe_fewest,
    fewest_processes,
    meta_model,
    plan_memory,
)
from .metrics import METRICS_FILE, Interval, append_metrics, interval_record
from .settings import (
    DEFAULT_SEQ_LEN,
    TrainConfig,
    as_json,
    check_options,
    describe_parts,
    fixed_settings,
    sequence_length,
)
from .sharding import shard_model
from .training_checkpoint import (
    TrainerState,
    check_settings,
    latest_checkpoint,
    load_training_checkpoint,
    read_checkpoint_record,
    save_training_checkpoint,
)


def _mixed_precision(choice: str) -> str:
    if choice not in ("auto", "yes", "no"):
        raise UsageError(
            "{option} must be auto, yes or no, not {choice!r}",
            problem=Problem.INVALID,
            option=Option("bf16"),
            choice=choice,
        )
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "bf16" if choice == "yes" else "no"


def _sequence_length(config: TrainConfig, model_config: dict[str, Any]) -> int:
    max_positions = model_config.get("max_position_embeddings")
    return sequence_length(config.seq_len, max_positions if isinstance(max_positions, int) else None)


def _corpus(config: TrainConfig, paths: list, langs: list[str] | None) -> CorpusSpec:
    return corpus_spec(
        paths,
        langs,
        config.original_langs,
        config.new_langs,
        config.data_format,
        config.text_field,
        config.lang_field,
    )


def _total_steps(config: TrainConfig, num_sequences: int, global_batch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    if config.max_tokens is not None:
        return max(1, math.ceil(config.max_tokens / (global_batch * config.seq_len)))
    return max(1, num_sequences // global_batch)  # one epoch


def _settings(
    config: TrainConfig, model_config: dict, data_key: str, accelerator: Accelerator, total_steps: int
) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint it continues."""
    settings = fixed_settings(config)
    settings.update(
        model=hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()[:16],
        data=data_key,
        world_size=accelerator.num_processes,
        distributed="FSDP2" if accelerator.is_fsdp2 else accelerator.distributed_type.value,
        total_steps=total_steps,
    )
    return as_json(settings)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: the MoE blocks stash router logits as a side output, which
    reentrant checkpointing would cut from the graph (no router gradient from the auxiliary losses)."""
    if hasattr(model, "activation_checkpointing_enable"):  # recent transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class TrainingRun:
    """A run between steps: what ``setup`` built and what the loop advances (``state``)."""

    config: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    corpus: CorpusSpec
    sequences: PackedSequences
    eval_sequences: PackedSequences | None
    order: SequenceOrder
    state: TrainerState
    total_steps: int
    global_batch: int
    aux_coef: float
    lpr_coef: float
    model_dir: Path
    model_config: dict[str, Any]
    output: OutputFolder | None  # the claimed --out (main process only)
    interval: Interval = field(init=False)
    bar: tqdm = field(init=False)

    def __post_init__(self) -> None:
        self.interval = Interval(self.counts_shape, self.accelerator.device)
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            unit="step",
            dynamic_ncols=True,
            disable=None if self.is_main and self.config.progress else True,
        )

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def moe(self) -> MoEConfig:
        return self.accelerator.unwrap_model(self.model).config

    @property
    def counts_shape(self) -> tuple[int, int, int]:
        """[MoE layers, languages, experts] of the routing counts."""
        return (len(self.moe.moe_layers), len(self.corpus.languages), self.moe.num_experts)

    @property
    def finished(self) -> bool:
        return self.state.step >= self.total_steps


def setup(config: TrainConfig) -> TrainingRun:
    """Check the options, then build the accelerator, output folder, data, model, optimizer and
    schedule, and load the checkpoint to resume from: everything the loop needs. A checkpoint that
    is not this run's is refused before anything is written."""
    check_options(config)
    parts = trainable_parts(config.stage, config.trainable)
    model_dir, out = resolve_model(config.model), Path(config.out)
    model_config = read_moe_config(model_dir)
    seq_len = _sequence_length(config, model_config)
    corpus, eval_corpus = _check_data(config, out)
    resume_from = _resume_checkpoint(config, out)
    record = read_checkpoint_record(resume_from) if resume_from else None
    accelerator = _setup_accelerator(config)
    _check_memory(replace(config, seq_len=seq_len), accelerator, model_config, parts)
    if seq_len != (config.seq_len or DEFAULT_SEQ_LEN):
        accelerator.print(
            f"pdmoe cpt: sequences of {seq_len} tokens, the model's maximum, "
            f"instead of the default {DEFAULT_SEQ_LEN}"
        )
    config = replace(config, seq_len=seq_len)
    output_rules = {
        "inputs": (model_dir, *config.data, *config.eval_data),
        "overwrite": config.overwrite,
        "resume": config.resume is not None,
    }
    check_output(out, Command.CPT, **output_rules)  # fail before the long preparations
    sequences, eval_sequences = _setup_data(config, accelerator, model_dir, corpus, eval_corpus)
    global_batch = config.micro_batch_size * config.grad_accum * accelerator.num_processes
    total_steps = _total_steps(config, len(sequences), global_batch)
    settings = _settings(config, model_config, sequences.cache.key, accelerator, total_steps)
    if record is not None:
        check_settings(resume_from, record, settings)
    state = record.state if record is not None else TrainerState(settings=settings)
    model, params, optimizer, scheduler = _setup_training(config, accelerator, model_dir, parts, total_steps)
    if record is not None:
        load_training_checkpoint(accelerator, resume_from, record, model, optimizer, scheduler)
    output: list[OutputFolder] = []  # claimed once nothing can be refused any more, before any write

    def claim() -> None:
        output.append(
            claim_output(out, Command.CPT, settings=asdict(config), keep_partial=True, **output_rules)
        )

    together(
        accelerator,
        claim,
        main_only=True,
        elsewhere=CheckpointError(f"the main process could not claim {out}"),
    )
    if record is not None:
        if accelerator.is_main_process:
            truncate_metrics(out / METRICS_FILE, state.step)
        accelerator.print(f"pdmoe cpt: resumed from {resume_from} at step {state.step}")
    moe = accelerator.unwrap_model(model).config
    return TrainingRun(
        config=config,
        accelerator=accelerator,
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        corpus=corpus,
        sequences=sequences,
        eval_sequences=eval_sequences,
        order=SequenceOrder(len(sequences), config.seed),
        state=state,
        total_steps=total_steps,
        global_batch=global_batch,
        aux_coef=moe.router_aux_loss_coef if config.aux_loss_coef is None else config.aux_loss_coef,
        lpr_coef=config.lpr_coef if parse_stage(config.stage) is Stage.REVIEW else 0.0,
        model_dir=model_dir,
        model_config=model_config,
        output=output[0] if output else None,
    )


def run_shape(config: TrainConfig, parts: tuple[Part, ...], mixed_precision: bool) -> RunShape:
    """What the memory plan needs of the options (``config.seq_len`` already resolved)."""
    return RunShape(
        parts, config.micro_batch_size, config.seq_len, config.gradient_checkpointing, mixed_precision
    )


def _check_memory(
    config: TrainConfig, accelerator: Accelerator, model_config: dict[str, Any], parts: tuple[Part, ...]
) -> None:
    """Refuse, before any weight is loaded, a run whose plan does not fit the GPU (``gpu_memory``,
    or the device's own memory; nothing is checked off GPUs unless ``gpu_memory`` is given)."""
    if config.gpu_memory is not None:
        capacity = parse_size(config.gpu_memory, "gpu_memory")
    elif accelerator.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(accelerator.device).total_memory
    else:
        return
    model = meta_model(model_config, parts)
    shape = run_shape(config, parts, accelerator.mixed_precision == "bf16")
    plan = plan_memory(model, accelerator.num_processes, shape, sharded=accelerator.is_fsdp2)
    check_fits(model, plan, shape, capacity)


def dry_run(config: TrainConfig, num_processes: int | None = None, spell: Spelling = keyword_spelling) -> str:
    """The memory plan of the run ``config`` describes on ``num_processes`` processes (default: the
    launch's; FSDP2 when more than one), from ``config.json`` alone: nothing is read or written.
    ``spell`` names the options the report suggests changing (the command line's flags, or keywords)."""
    check_options(config)
    world = int(os.environ.get("WORLD_SIZE", "1")) if num_processes is None else num_processes
    if isinstance(world, bool) or not isinstance(world, int) or not 1 <= world <= MAX_PROCESSES:
        raise UsageError(
            "{option} must be a whole number from 1 to {maximum}, got {world!r}",
            problem=Problem.INVALID,
            option=Option("num_processes"),
            maximum=MAX_PROCESSES,
            world=world,
        )
    capacity = parse_size(config.gpu_memory or DEFAULT_GPU_MEMORY, "gpu_memory")
    parts = trainable_parts(config.stage, config.trainable)
    model_dir = resolve_model(config.model)
    model_config = read_moe_config_only(model_dir)
    config = replace(config, seq_len=_sequence_length(config, model_config))
    mixed_precision = _mixed_precision("yes" if config.bf16 == "auto" else config.bf16) == "bf16"
    model = meta_model(model_config, parts)
    shape = run_shape(config, parts, mixed_precision)
    plan = plan_memory(model, world, shape, sharded=world > 1)
    how = f"FSDP2 on {world} processes" if world > 1 else "one process"
    precision = "bf16 mixed precision" if mixed_precision else "float32"
    checkpointing = "on" if config.gradient_checkpointing else "off"
    verdict = "fits" if plan.fits(capacity) else "does NOT fit"
    return "\n".join(
        [
            f"pdmoe cpt: memory plan of {model_dir}: {how}, {precision}, micro-batch {config.micro_batch_size} "
            f"x {config.seq_len} tokens, gradient checkpointing {checkpointing}, training {','.join(parts)}",
            "per process:",
            plan.table(),
            f"{verdict} in {capacity / GB:.1f} GB per GPU; "
            + describe_fewest(fewest_processes(model, shape, capacity), capacity, spell),
            "(not counted: the CUDA context, allocator fragmentation and communication buffers: keep a few GB spare)",
        ]
    )


def _check_data(config: TrainConfig, out: Path) -> tuple[CorpusSpec, CorpusSpec | None]:
    """The training and eval corpora, checked against the stage and the output folder."""
    corpus = _corpus(config, config.data, config.langs)
    if parse_stage(config.stage) is Stage.REVIEW and not corpus.original_languages:
        raise UsageError(
            "the review stage needs original-language text: declare it with {original_langs}",
            problem=Problem.MISSING,
            original_langs=Option("original_langs"),
        )
    eval_corpus = _corpus(config, config.eval_data, config.eval_langs) if config.eval_data else None
    if config.resume is None and latest_checkpoint(out) is not None and not config.overwrite:
        raise UsageError(
            "{out} already holds training checkpoints; pass {resume} to continue or {overwrite} to restart",
            problem=Problem.REFUSED,
            out=out,
            resume=RESUME[Command.CPT],
            overwrite=OVERWRITE,
        )
    return corpus, eval_corpus


def _setup_accelerator(config: TrainConfig) -> Accelerator:
    # The buffers (rotary frequencies) are computed alike on every process: DDP need not
    # re-broadcast them from rank 0 before every forward.
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(config.bf16),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UsageError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes}; "
            "on a machine without GPUs launch with ACCELERATE_USE_CPU=1 (`accelerate launch --multi_gpu ...`)"
        )
    _check_strategy(accelerator)
    return accelerator


def _check_strategy(accelerator: Accelerator) -> None:
    """Refuse the strategies whose gradient clipping or checkpoints would be wrong for a model that
    trains only some of its parameters (tested: one process, DDP, FSDP2)."""
    kind = accelerator.distributed_type
    if kind is DistributedType.FSDP and not accelerator.is_fsdp2:
        raise UsageError(
            "FSDP version 1 is not supported (it clips each process's gradients by their own norm when only "
            "some parameters train); set fsdp_version: 2 in the accelerate config"
        )
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA):
        raise UsageError(
            f"accelerate's {kind.value} set-up is not supported by pdmoe cpt; use FSDP (fsdp_version: 2) or DDP"
        )


def _setup_data(
    config: TrainConfig,
    accelerator: Accelerator,
    model_dir: Path,
    corpus: CorpusSpec,
    eval_corpus: CorpusSpec | None,
) -> tuple[PackedSequences, PackedSequences | None]:
    """Tokenise (or reuse the cache of) the corpora, once per node, and pack them."""
    tokenizer = load_tokenizer(model_dir)
    with accelerator.local_main_process_first():
        sequences = PackedSequences(TokenCache.build(corpus, tokenizer, config.cache_dir), config.seq_len)
        eval_sequences = (
            PackedSequences(TokenCache.build(eval_corpus, tokenizer, config.cache_dir), config.seq_len)
            if eval_corpus is not None
            else None
        )
    world = accelerator.num_processes
    if eval_sequences is not None and min(config.eval_max_sequences, len(eval_sequences)) < world:
        raise UsageError(
            f"the eval data must give every one of the {world} processes a sequence; add eval data"
        )
    return sequences, eval_sequences


def _setup_training(
    config: TrainConfig, accelerator: Accelerator, model_dir: Path, parts: tuple[Part, ...], total_steps: int
) -> tuple[
    torch.nn.Module, list[torch.nn.Parameter], torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler
]:
    """The MoE with only ``parts`` trainable, AdamW with linear warmup and cosine decay to
    ``min_lr_ratio`` of the peak, prepared by accelerate (under FSDP2 the model is sharded first,
    evenly, by ``sharding.shard_model``), and the trainable parameters."""
    torch.manual_seed(config.seed)
    model = load_moe_model(model_dir)
    model.config.use_cache = False
    apply_trainable(model, parts)
    # Keys that are the modules' own tensors: what sharded state dicts need; fused at the final save.
    model.set_experts_state_dict_layout(StateDictLayout.SPLIT)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    trainable, total = count_parameters(model)
    accelerator.print(
        f"pdmoe cpt: stage {parse_stage(config.stage).value} trains {describe_parts(parts)}: "
        f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.1f} %)"
    )
    if accelerator.is_fsdp2:
        model = shard_model(accelerator, model)  # accelerate keeps an FSDP module as it is
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        betas=(0.9, 0.95),
        weight_decay=config.weight_decay,
    )
    warmup = config.warmup_steps if config.warmup_steps is not None else total_steps // 100
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup, total_steps, min_lr_rate=config.min_lr_ratio
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, [p for p in model.parameters() if p.requires_grad], optimizer, scheduler


def forward_backward_step(
    run: TrainingRun, input_ids: torch.Tensor, is_original: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One micro-batch: loss = LM + aux_coef·load balancing (+ lpr_coef·LPR), backward scaled for
    accumulation. Returns the detached ``Losses`` as one vector, and the router logits."""
    output = run.model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    lpr = (
        language_prior_loss(output.router_logits, is_original, run.moe.num_original_experts)
        if run.lpr_coef
        else output.lm_loss.new_zeros(())
    )
    loss = output.lm_loss + run.aux_coef * output.aux_loss + run.lpr_coef * lpr
    run.accelerator.backward(loss / run.config.grad_accum)
    return Losses(loss, output.lm_loss, output.aux_loss, lpr).vector(), output.router_logits


def train_step(run: TrainingRun) -> torch.Tensor:
    """One optimizer step over the next global batch (every micro-batch of every process); advances
    ``run.state`` and the logging interval, returns the gradient norm before clipping.

    Raises ``TrainingError`` before the update when a loss or the gradient norm is not finite, so
    the weights and the checkpoints on disk stay the last good ones."""
    config, accelerator = run.config, run.accelerator
    world, num_langs = accelerator.num_processes, len(run.corpus.languages)
    step_indices = run.order.take(run.state.position, run.global_batch)
    step_losses = Losses.zeros(accelerator.device)
    for micro in range(config.grad_accum):
        indices = micro_batch_slice(
            step_indices, micro, accelerator.process_index, world, config.micro_batch_size
        )
        input_ids, langs = (t.to(accelerator.device) for t in run.sequences.batch(indices))
        sync = nullcontext() if micro == config.grad_accum - 1 else accelerator.no_sync(run.model)
        with sync:
            losses, router_logits = forward_backward_step(
                run, input_ids, langs < run.corpus.num_original_languages
            )
        step_losses += losses / config.grad_accum
        run.interval.counts += expert_token_counts(
            router_logits, langs, num_langs, run.moe.num_experts_per_tok
        )
    grad_norm = clip_gradients(run)
    _stop_unless_finite(run, step_losses, grad_norm)
    run.interval.losses += step_losses
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    tokens = run.global_batch * config.seq_len
    run.state.step += 1
    run.state.position += run.global_batch
    run.state.tokens_seen += tokens
    run.interval.steps += 1
    run.interval.tokens += tokens
    run.bar.update(1)
    return grad_norm


def clip_gradients(run: TrainingRun) -> torch.Tensor:
    """Clip the gradients to ``max_grad_norm`` (0: no clipping) by their norm over every process
    and every trainable parameter (sharded ones included), and return that norm."""
    max_norm = run.config.max_grad_norm or math.inf  # a factor of exactly 1 when off
    norm = run.accelerator.clip_grad_norm_(run.params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


_CHECKED = (*Losses._fields, "gradient norm")


def _stop_unless_finite(run: TrainingRun, step_losses: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Every process stops together when any process's loss, or the gradient norm, is NaN or infinite."""
    values = torch.cat(
        [
            run.accelerator.reduce(step_losses, "sum"),
            grad_norm.detach().double().reshape(1).to(step_losses.device),
        ]
    ).tolist()
    bad = [
        f"{name} is {value}" for name, value in zip(_CHECKED, values, strict=True) if not math.isfinite(value)
    ]
    if bad:
        run.accelerator.wait_for_everyone()  # see collective.any_process
        last = latest_checkpoint(run.out)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise TrainingError(
            "step {step}: {bad}; stopped before updating the weights and {kept} "
            "(lower {lr}, raise {warmup_steps} or check the data, then rerun with {resume})",
            step=run.state.step + 1,
            bad=", ".join(bad),
            kept=kept,
            lr=Option("lr"),
            warmup_steps=Option("warmup_steps"),
            resume=RESUME[Command.CPT],
        )


def log_metrics(run: TrainingRun, grad_norm: torch.Tensor) -> dict[str, Any]:
    """Reduce the interval over processes, append it to ``metrics.jsonl`` and start a new interval."""
    lr = run.scheduler.get_last_lr()[0]
    record = interval_record(
        run.accelerator, run.interval, run.state, lr, grad_norm, run.corpus, run.moe.moe_layers
    )
    run.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
    if run.is_main:
        append_metrics(run.out / METRICS_FILE, record)
        if run.bar.disable and run.config.progress:
            print(
                f"step {run.state.step}/{run.total_steps} loss {record['loss']:.4f} "
                f"lr {record['lr']:.3g} {record['tokens_per_s']:.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    run.interval = Interval(run.counts_shape, run.accelerator.device)
    return record


def evaluate(run: TrainingRun) -> EvalResult:
    """Evaluate on the eval data (every process an equal share), log it and go back to training."""
    result = _evaluate(run.accelerator, run.model, run.eval_sequences, run.config)
    run.model.train()
    if run.is_main:
        append_metrics(run.out / METRICS_FILE, {"step": run.state.step, "eval": result.to_dict()})
    return result


def save_checkpoint(run: TrainingRun) -> Path:
    """A resumable checkpoint of the run as it is now."""
    return save_training_checkpoint(
        run.accelerator,
        run.out,
        run.state,
        run.config.keep_checkpoints,
        run.model,
        run.optimizer,
        run.scheduler,
    )


def _due(step: int, every: int, last: int) -> bool:
    return step == last or bool(every and step % every == 0)


def train(config: TrainConfig) -> Path:
    """Run CPT or the review stage; returns the output directory holding the final HF checkpoint."""
    run = setup(config)
    accelerator, out = run.accelerator, run.out
    try:
        _train_to_the_end(run)
    finally:
        # The DDP / FSDP wrappers hold the process group. Free them while the group is still alive,
        # so that its worker threads are joined by destroy_process_group (which releases the GIL)
        # and not by a wrapper's destructor, which holds the GIL while a worker may be waiting for it
        # to free a tensor of its last collective: a deadlock seen with gloo under load.
        del run
        accelerator.free_memory()
        accelerator.end_training()
    return out


def _train_to_the_end(run: TrainingRun) -> None:
    """The loop with its logs, evaluations and checkpoints, then the final model."""
    config = run.config
    run.model.train()
    with run.output if run.output is not None else nullcontext():  # the lock goes on every exit
        while not run.finished:
            grad_norm = train_step(run)
            step = run.state.step
            if _due(step, config.log_every, run.total_steps):
                log_metrics(run, grad_norm)
            if run.eval_sequences is not None and _due(step, config.eval_every, run.total_steps):
                evaluate(run)
            if step % config.save_every == 0 and not run.finished:
                save_checkpoint(run)
        run.bar.close()
        save_final_model(
            run.accelerator, run.model, run.model_dir, run.out, checkpoint_dtype(run.model_config)
        )
        if run.output is not None:
            run.output.finish()


def _resume_checkpoint(config: TrainConfig, out: Path) -> Path | None:
    """``resume='latest'`` (a bare ``--resume`` on the command line) is the newest checkpoint under ``out``."""
    if config.resume is None:
        return None
    if str(config.resume) == "latest":
        found = latest_checkpoint(out)
        if found is None:
            raise UsageError(
                "{resume}: {out} holds no training checkpoint yet; start without {resume}",
                problem=Problem.INVALID,
                resume=Option("resume"),
                out=out,
            )
        return found
    path = Path(config.resume)
    if not path.is_dir():
        raise UsageError(
            "{resume} {path} is not a directory; pass a checkpoints/step-* directory or 'latest'",
            problem=Problem.INVALID,
            resume=Option("resume"),
            path=path,
        )
    return path


def _evaluate(accelerator: Accelerator, model, sequences: PackedSequences, config: TrainConfig) -> EvalResult:
    """Every process evaluates an equal share of ``eval_max_sequences`` sequences spread over the data."""
    world = accelerator.num_processes
    count = min(config.eval_max_sequences, len(sequences)) // world * world
    model.eval()
    mine = spread_indices(len(sequences), count)[accelerator.process_index :: world]
    result = evaluation_sums(model, sequences, mine, config.micro_batch_size, accelerator.device)
    result.nll_sum = accelerator.reduce(result.nll_sum, "sum").cpu()
    result.target_tokens = accelerator.reduce(result.target_tokens, "sum").cpu()
    result.expert_counts = accelerator.reduce(result.expert_counts, "sum").cpu()
    return result
