"""The arms of the comparison, run as independent units (one CPT run and every arm built on it).

All arms start from the same B and I. Per seed and learning rate:
    dense unit    dense CPT of B -> itself, + ParamΔ, TIES and DARE of (dense CPT, I) over B
    moe unit      upcycle B -> MoE CPT -> itself, DeltaMoE (graft), review stage -> itself,
                  DeltaMoE + review (graft of the reviewed model)
    matched unit  dense CPT with the training FLOPs of DeltaMoE + review -> itself, + ParamΔ
Every CPT run sees the same Spanish sequences in the same order for a given seed (the matched
unit continues that order for its extra steps). The MoE arms go through pdmoe's product path:
``pdmoe.upcycle.upcycle``, ``pdmoe.cpt.train``, ``pdmoe.graft.graft``.
"""

from __future__ import annotations

import enum
import functools
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pdmoe.cpt import TrainConfig, train
from pdmoe.graft import GraftOptions, graft
from pdmoe.graft.methods import MergeMethod
from pdmoe.graft.options import DEFAULT_OPTIONS
from pdmoe.io.hf_loading import load_causal_lm, load_tokenizer
from pdmoe.upcycle import upcycle

from .corpus import NEW, ORIGINAL
from .evaluate import HeldOut, evaluate
from .flops import dense_cpt_flops, moe_cpt_flops, review_flops
from .prepare import Prepared
from .protocol import Protocol
from .training import Schedule, packed, save, text_batches, train_steps


class Arm(enum.Enum):
    BASE = "B"
    INSTRUCT = "I"
    DENSE_CPT = "dense CPT"
    DENSE_PARAM_DELTA = "dense CPT + ParamΔ"
    DENSE_TIES = "dense TIES"
    DENSE_DARE = "dense DARE"
    MOE_CPT = "MoE CPT"
    DELTA_MOE = "DeltaMoE"
    MOE_REVIEW = "MoE CPT + review"
    DELTA_MOE_REVIEW = "DeltaMoE + review"
    MATCHED_CPT = "dense CPT, matched FLOPs"
    MATCHED_PARAM_DELTA = "dense CPT + ParamΔ, matched FLOPs"


GRAFTED = {
    Arm.DENSE_PARAM_DELTA,
    Arm.DENSE_TIES,
    Arm.DENSE_DARE,
    Arm.DELTA_MOE,
    Arm.DELTA_MOE_REVIEW,
    Arm.MATCHED_PARAM_DELTA,
}


class UnitKind(enum.Enum):
    DENSE = "dense"
    MOE = "moe"
    MATCHED = "matched"


@dataclass(frozen=True)
class Unit:
    kind: UnitKind
    seed: int
    lr: float
    steps: int

    @property
    def name(self) -> str:
        return f"{self.kind.value}-lr{self.lr:g}-seed{self.seed}"


@dataclass(frozen=True)
class Context:
    """What every unit needs; plain data, so that it can be sent to a worker process."""

    protocol: Protocol
    data: Path  # prepared data directory
    base: Path
    instruct: Path
    work: Path
    cache: Path
    keep_models: bool


def matched_steps(protocol: Protocol) -> int:
    """Dense CPT steps with the training FLOPs of MoE CPT + review (same tokens per step)."""
    size, seq = protocol.model, protocol.seq_len
    moe = moe_cpt_flops(size, seq, protocol.num_experts, protocol.top_k) * protocol.cpt_steps
    moe += review_flops(size, seq, protocol.num_experts, protocol.top_k) * protocol.review_steps
    return round(moe / dense_cpt_flops(size, seq))


def units(protocol: Protocol) -> list[Unit]:
    """Every unit of the study, longest first (the MoE CPT is the slowest per step); the matched
    unit runs at the middle learning rate of the dense sweep."""
    middle = protocol.dense_lrs[len(protocol.dense_lrs) // 2]
    found = [Unit(UnitKind.MOE, s, lr, protocol.cpt_steps) for lr in protocol.moe_lrs for s in protocol.seeds]
    found += [Unit(UnitKind.MATCHED, s, middle, matched_steps(protocol)) for s in protocol.seeds]
    found += [
        Unit(UnitKind.DENSE, s, lr, protocol.cpt_steps) for lr in protocol.dense_lrs for s in protocol.seeds
    ]
    return found


def heldout(ctx: Context) -> list[HeldOut]:
    return heldout_of(ctx.data, "test", ctx.base, ctx.protocol.seq_len, ctx.cache)


@functools.cache
def heldout_of(data_dir: Path, split: str, base: Path, seq_len: int, cache: Path) -> list[HeldOut]:
    """The held-out text and task items of ``split``, loaded once per process."""
    data = Prepared(data_dir, {})
    tokenizer = load_tokenizer(base)
    return [
        HeldOut(
            lang,
            packed([data.path(f"heldout-{split}-{lang}.jsonl")], tokenizer, seq_len, cache),
            data.cloze(f"{split}-{lang}"),
        )
        for lang in (ORIGINAL, NEW)
    ]


def record(ctx: Context, arm: Arm, model_dir: Path, unit: Unit | None, train: dict | None = None) -> dict:
    start = time.perf_counter()
    result = evaluate(model_dir, heldout(ctx), ctx.protocol.eval_sequences, ctx.protocol.answer_form)
    return {
        "arm": arm.value,
        "unit": None if unit is None else unit.name,
        "seed": None if unit is None else unit.seed,
        "lr": None if unit is None else unit.lr,
        "eval": result,
        "train": train,
        "eval_seconds": time.perf_counter() - start,
    }


def _graft(ctx: Context, cpt: Path, out: Path, options: GraftOptions = DEFAULT_OPTIONS) -> Path:
    graft(ctx.base, ctx.instruct, cpt, out, options)
    return out


def run_unit(unit: Unit, ctx: Context) -> list[dict]:
    work = ctx.work / unit.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if unit.kind is UnitKind.MOE:
            return _moe_unit(unit, ctx, work)
        return _dense_unit(unit, ctx, work)
    finally:
        if not ctx.keep_models:
            shutil.rmtree(work, ignore_errors=True)


def _dense_unit(unit: Unit, ctx: Context, work: Path) -> list[dict]:
    protocol = ctx.protocol
    tokenizer = load_tokenizer(ctx.base)
    sequences = packed([ctx.data / "cpt.jsonl"], tokenizer, protocol.seq_len, ctx.cache)
    model = load_causal_lm(ctx.base, dtype=torch.float32)
    start = time.perf_counter()
    losses = train_steps(
        model, text_batches(sequences, unit.seed, protocol.batch), Schedule(unit.steps, unit.lr)
    )
    cpt = save(model, tokenizer, work / "cpt")
    log = _train_log(losses, time.perf_counter() - start, unit.steps * protocol.batch * protocol.seq_len)
    matched = unit.kind is UnitKind.MATCHED
    records = [record(ctx, Arm.MATCHED_CPT if matched else Arm.DENSE_CPT, cpt, unit, log)]
    delta = _graft(ctx, cpt, work / "param-delta")
    records.append(record(ctx, Arm.MATCHED_PARAM_DELTA if matched else Arm.DENSE_PARAM_DELTA, delta, unit))
    if not matched:
        ties = _graft(
            ctx, cpt, work / "ties", GraftOptions(method=MergeMethod.TIES, density=protocol.ties_density)
        )
        records.append(record(ctx, Arm.DENSE_TIES, ties, unit))
        dare = _graft(
            ctx,
            cpt,
            work / "dare",
            GraftOptions(method=MergeMethod.DARE, density=protocol.dare_density, seed=unit.seed),
        )
        records.append(record(ctx, Arm.DENSE_DARE, dare, unit))
    return records


def _moe_unit(unit: Unit, ctx: Context, work: Path) -> list[dict]:
    protocol = ctx.protocol
    moe = upcycle(
        ctx.base, work / "moe", num_experts=protocol.num_experts, top_k=protocol.top_k, seed=unit.seed
    )
    start = time.perf_counter()
    cpt = train(_train_config(ctx, moe, work / "cpt", unit, "cpt"))
    log = _metrics_log(cpt, time.perf_counter() - start, unit.steps * protocol.batch * protocol.seq_len)
    records = [record(ctx, Arm.MOE_CPT, cpt, unit, log)]
    records.append(record(ctx, Arm.DELTA_MOE, _graft(ctx, cpt, work / "delta-moe"), unit))
    start = time.perf_counter()
    reviewed = train(_train_config(ctx, cpt, work / "review", unit, "review"))
    log = _metrics_log(
        reviewed, time.perf_counter() - start, protocol.review_steps * protocol.batch * protocol.seq_len
    )
    records.append(record(ctx, Arm.MOE_REVIEW, reviewed, unit, log))
    records.append(record(ctx, Arm.DELTA_MOE_REVIEW, _graft(ctx, reviewed, work / "delta-moe-review"), unit))
    return records


def _train_config(ctx: Context, model: Path, out: Path, unit: Unit, stage: str) -> TrainConfig:
    protocol = ctx.protocol
    review = stage == "review"
    return TrainConfig(
        model=model,
        data=[ctx.data / ("review.jsonl" if review else "cpt.jsonl")],
        out=out,
        stage=stage,
        original_langs=[ORIGINAL],
        new_langs=[NEW],
        cache_dir=ctx.cache,
        seq_len=protocol.seq_len,
        micro_batch_size=protocol.batch,
        max_steps=protocol.review_steps if review else unit.steps,
        lr=protocol.review_lr if review else unit.lr,
        seed=unit.seed,
        bf16="no",
        aux_loss_coef=protocol.aux_coef,
        lpr_coef=protocol.lpr_coef,
        save_every=10**9,
        log_every=max(1, (protocol.review_steps if review else unit.steps) // 10),
        progress=False,
    )


def _train_log(losses: Sequence[float], seconds: float, tokens: int) -> dict:
    """Mean LM loss over the first and the last tenth of the steps, time and tokens."""
    tenth = max(1, len(losses) // 10)
    return {
        "loss_first": sum(losses[:tenth]) / tenth,
        "loss_last": sum(losses[-tenth:]) / tenth,
        "seconds": seconds,
        "tokens": tokens,
    }


def _metrics_log(out: Path, seconds: float, tokens: int) -> dict:
    """The same from pdmoe cpt's metrics.jsonl, logged every tenth of the steps."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["lm_loss"] for line in lines if "lm_loss" in line]
    return {"loss_first": losses[0], "loss_last": losses[-1], "seconds": seconds, "tokens": tokens}
