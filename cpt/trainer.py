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
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from tqdm.auto import tqdm
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from pdmoe.errors import UsageError
from pdmoe.io.writer import prepare_output_dir

from .checkpoints import (
    TrainerState,
    checkpoint_dtype,
    latest_checkpoint,
    load_moe_model,
    load_tokenizer,
    read_moe_config,
    read_trainer_state,
    save_final_model,
    save_training_checkpoint,
    truncate_metrics,
)
from .data import (
    CorpusSpec,
    PackedSequences,
    SequenceOrder,
    TokenCache,
    corpus_spec,
    micro_batch_slice,
)
from .evaluate import EvalResult, evaluation_sums, expert_token_counts, shares_by_language, spread_indices
from .freezing import apply_trainable, count_parameters, trainable_parts
from .losses import language_prior_loss

METRICS_FILE = "metrics.jsonl"
# Settings that do not change the trajectory, so a resumed run may change them.
_FREE_SETTINGS = (
    "out",
    "resume",
    "overwrite",
    "save_every",
    "keep_checkpoints",
    "log_every",
    "eval_data",
    "eval_langs",
    "eval_every",
    "eval_max_sequences",
    "cache_dir",
    "progress",
    "gradient_checkpointing",
)


@dataclass
class TrainConfig:
    """Every option of ``pdmoe cpt`` (CLI names are these with dashes); defaults follow METHOD.md."""

    model: str | Path
    data: list[str | Path]
    out: str | Path
    stage: str = "cpt"
    original_langs: list[str] = field(default_factory=list)
    new_langs: list[str] = field(default_factory=list)
    langs: list[str] | None = None
    data_format: str = "auto"
    text_field: str = "text"
    lang_field: str = "lang"
    cache_dir: str | Path | None = None
    seq_len: int = 1024
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None
    lr: float = 5e-5
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: str = "auto"
    gradient_checkpointing: bool = False
    aux_loss_coef: float | None = None
    lpr_coef: float = 0.1
    trainable: str | None = None
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str | Path | None = None
    eval_data: list[str | Path] = field(default_factory=list)
    eval_langs: list[str] | None = None
    eval_every: int = 0
    eval_max_sequences: int = 64
    log_every: int = 10
    overwrite: bool = False
    progress: bool = True


def _mixed_precision(choice: str) -> str:
    if choice not in ("auto", "yes", "no"):
        raise UsageError(f"--bf16 must be auto, yes or no, not {choice!r}")
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "bf16" if choice == "yes" else "no"


def _check_numbers(config: TrainConfig) -> None:
    positive = {
        "--seq-len": config.seq_len,
        "--micro-batch-size": config.micro_batch_size,
        "--grad-accum": config.grad_accum,
        "--save-every": config.save_every,
        "--log-every": config.log_every,
    }
    for option, value in positive.items():
        if value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    if config.max_steps is not None and config.max_tokens is not None:
        raise UsageError("give --max-steps or --max-tokens, not both")
    if config.lr <= 0 or not 0 <= config.min_lr_ratio <= 1 or config.max_grad_norm < 0:
        raise UsageError("--lr must be positive, --min-lr-ratio in [0, 1] and --max-grad-norm non-negative")


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
    config: TrainConfig, model_config: dict, data_key: str, world_size: int, total_steps: int
) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint it continues."""
    settings = {k: v for k, v in asdict(config).items() if k not in _FREE_SETTINGS}
    settings.update(
        model=hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()[:16],
        data=data_key,
        world_size=world_size,
        total_steps=total_steps,
    )
    return json.loads(json.dumps(settings, default=str))


class _Interval:
    """Sums of one logging interval, reduced over processes when logged."""

    def __init__(self, counts_shape: tuple[int, ...], device: torch.device) -> None:
        self.losses = torch.zeros(4, dtype=torch.float64, device=device)  # total, lm, aux, lpr
        self.counts = torch.zeros(counts_shape, dtype=torch.int64, device=device)
        self.steps = 0
        self.tokens = 0
        self.start = time.perf_counter()


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: the MoE blocks stash router logits as a side output, which
    reentrant checkpointing would cut from the graph (no router gradient from the auxiliary losses)."""
    if hasattr(model, "activation_checkpointing_enable"):  # recent transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train(config: TrainConfig) -> Path:
    """Run CPT or the review stage; returns the output directory holding the final HF checkpoint."""
    _check_numbers(config)
    parts = trainable_parts(config.stage, config.trainable)
    model_dir, out = Path(config.model), Path(config.out)
    model_config = read_moe_config(model_dir)
    max_positions = model_config.get("max_position_embeddings")
    if max_positions is not None and config.seq_len > max_positions:
        raise UsageError(
            f"--seq-len {config.seq_len} is larger than the model's maximum ({max_positions} positions)"
        )
    corpus = _corpus(config, config.data, config.langs)
    if config.stage == "review" and not corpus.original_languages:
        raise UsageError("the review stage needs original-language text: declare it with --original-langs")
    eval_corpus = _corpus(config, config.eval_data, config.eval_langs) if config.eval_data else None
    if config.resume is None and latest_checkpoint(out) is not None and not config.overwrite:
        raise UsageError(
            f"{out} already holds training checkpoints; pass --resume to continue or --overwrite to restart"
        )

    # The frozen experts are buffers, identical on every process: DDP must not re-broadcast them
    # from rank 0 before every forward (the whole dense FFN stack, every step).
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(config.bf16),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UsageError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes}; "
            "on a machine without GPUs launch with ACCELERATE_USE_CPU=1 (accelerate launch --multi_gpu ...)"
        )
    main = accelerator.is_main_process
    if main:
        prepare_output_dir(
            out, overwrite=config.overwrite, resume=config.resume is not None, inputs=(model_dir,)
        )
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
    global_batch = config.micro_batch_size * config.grad_accum * world
    total_steps = _total_steps(config, len(sequences), global_batch)
    settings = _settings(config, model_config, sequences.cache.key, world, total_steps)
    resume_from = _resume_checkpoint(config, out)
    state = read_trainer_state(resume_from, settings) if resume_from else TrainerState(settings=settings)

    torch.manual_seed(config.seed)
    model = load_moe_model(model_dir)
    model.config.use_cache = False
    apply_trainable(model, parts)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    trainable, total = count_parameters(model)
    accelerator.print(
        f"pdmoe cpt: stage {config.stage}, training {','.join(parts)}: {trainable:,} of {total:,} parameters"
    )
    model = accelerator.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    warmup = config.warmup_steps if config.warmup_steps is not None else total_steps // 100
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup, total_steps, min_lr_rate=config.min_lr_ratio
    )
    optimizer = accelerator.prepare(optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if resume_from:
        accelerator.load_state(str(resume_from))
        if main:
            truncate_metrics(out / METRICS_FILE, state.step)
        accelerator.print(f"pdmoe cpt: resumed from {resume_from} at step {state.step}")

    moe = accelerator.unwrap_model(model).config
    aux_coef = moe.router_aux_loss_coef if config.aux_loss_coef is None else config.aux_loss_coef
    lpr_coef = config.lpr_coef if config.stage == "review" else 0.0
    num_langs = len(corpus.languages)
    order = SequenceOrder(len(sequences), config.seed)
    interval = _Interval((len(moe.moe_layers), num_langs, moe.num_experts), accelerator.device)
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        unit="step",
        dynamic_ncols=True,
        disable=None if main and config.progress else True,
    )
    metrics_path = out / METRICS_FILE
    model.train()
    while state.step < total_steps:
        step_indices = order.take(state.position, global_batch)
        for micro in range(config.grad_accum):
            indices = micro_batch_slice(
                step_indices, micro, accelerator.process_index, world, config.micro_batch_size
            )
            input_ids, langs = (t.to(accelerator.device) for t in sequences.batch(indices))
            sync = nullcontext() if micro == config.grad_accum - 1 else accelerator.no_sync(model)
            with sync:
                losses, router_logits = _forward_backward(
                    accelerator,
                    model,
                    input_ids,
                    langs < corpus.num_original_languages,
                    aux_coef,
                    lpr_coef,
                    moe.num_original_experts,
                    config.grad_accum,
                )
            interval.losses += losses / config.grad_accum
            interval.counts += expert_token_counts(router_logits, langs, num_langs, moe.num_experts_per_tok)
        grad_norm = (
            accelerator.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm else None
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.position += global_batch
        state.tokens_seen += global_batch * config.seq_len
        interval.steps += 1
        interval.tokens += global_batch * config.seq_len
        bar.update(1)

        if state.step % config.log_every == 0 or state.step == total_steps:
            record = _log_record(
                accelerator, interval, state, scheduler.get_last_lr()[0], grad_norm, corpus, moe.moe_layers
            )
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if main:
                _append_metrics(metrics_path, record)
                if bar.disable and config.progress:
                    print(
                        f"step {state.step}/{total_steps} loss {record['loss']:.4f} "
                        f"lr {record['lr']:.3g} {record['tokens_per_s']:.0f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
            interval = _Interval(interval.counts.shape, accelerator.device)
        due = state.step == total_steps or (config.eval_every and state.step % config.eval_every == 0)
        if eval_sequences is not None and due:
            result = _evaluate(accelerator, model, eval_sequences, config)
            model.train()
            if main:
                _append_metrics(metrics_path, {"step": state.step, "eval": result.to_dict()})
        if state.step % config.save_every == 0 and state.step < total_steps:
            save_training_checkpoint(accelerator, out, state, config.keep_checkpoints)
    bar.close()
    save_final_model(accelerator, model, model_dir, out, checkpoint_dtype(model_config))
    accelerator.end_training()
    return out


def _forward_backward(
    accelerator: Accelerator,
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    is_original: torch.Tensor,
    aux_coef: float,
    lpr_coef: float,
    num_original_experts: int,
    grad_accum: int,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One micro-batch: loss = LM + aux_coef·load balancing (+ lpr_coef·LPR), backward scaled for
    accumulation. Returns the detached (total, lm, aux, lpr) losses and the router logits."""
    output = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    lpr = (
        language_prior_loss(output.router_logits, is_original, num_original_experts)
        if lpr_coef
        else output.lm_loss.new_zeros(())
    )
    loss = output.lm_loss + aux_coef * output.aux_loss + lpr_coef * lpr
    accelerator.backward(loss / grad_accum)
    return torch.stack([loss, output.lm_loss, output.aux_loss, lpr]).detach().double(), output.router_logits


def _resume_checkpoint(config: TrainConfig, out: Path) -> Path | None:
    """``--resume latest`` (or a bare ``--resume``) is the newest checkpoint under ``--out``."""
    if config.resume is None:
        return None
    if str(config.resume) == "latest":
        found = latest_checkpoint(out)
        if found is None:
            raise UsageError(f"--resume: {out} holds no training checkpoint yet; start without --resume")
        return found
    path = Path(config.resume)
    if not path.is_dir():
        raise UsageError(
            f"--resume {path} is not a directory; pass a checkpoints/step-* directory or 'latest'"
        )
    return path


def _log_record(
    accelerator: Accelerator,
    interval: _Interval,
    state: TrainerState,
    lr: float,
    grad_norm: torch.Tensor | None,
    corpus: CorpusSpec,
    moe_layers: list[int],
) -> dict[str, Any]:
    losses = accelerator.reduce(interval.losses, "mean") / interval.steps
    counts = accelerator.reduce(interval.counts, "sum").cpu()
    elapsed = time.perf_counter() - interval.start
    record = dict(zip(("loss", "lm_loss", "aux_loss", "lpr_loss"), losses.tolist(), strict=True))
    record.update(
        step=state.step,
        lr=lr,
        grad_norm=None if grad_norm is None else float(grad_norm),
        tokens_seen=state.tokens_seen,
        tokens_per_s=interval.tokens / max(elapsed, 1e-9),
        expert_load=shares_by_language(counts, corpus.languages, moe_layers),
    )
    return record


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


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
