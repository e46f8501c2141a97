"""The two models every arm starts from: the base B and its instruct model I.

B is pre-trained from scratch on English with its share of Spanish (an English-only base leaves
the embeddings of Spanish tokens untrained, and DeltaMoE freezes embeddings). I is B after SFT on
the English task mixed with ordinary text (task examples alone destroy language modelling).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pdmoe.io.hf_loading import load_causal_lm, load_tokenizer

from .prepare import Prepared
from .protocol import Protocol
from .training import (
    Schedule,
    new_model,
    pack_items,
    packed,
    save,
    sft_batches,
    split_loss,
    text_batches,
    train_steps,
)

BASE_SEED = 0


def train_base(
    protocol: Protocol, data: Prepared, out: Path, cache_dir: Path, log: Callable[[str], None]
) -> Path:
    tokenizer = load_tokenizer(data.tokenizer)
    sequences = packed([data.path("base.jsonl")], tokenizer, protocol.seq_len, cache_dir)
    model = new_model(protocol.model, tokenizer, protocol.seq_len, BASE_SEED)
    start = time.perf_counter()
    losses = train_steps(
        model,
        text_batches(sequences, BASE_SEED, protocol.batch),
        Schedule(protocol.base_steps, protocol.base_lr),
        lambda message: log(f"B: {message}"),
    )
    record = {
        "losses": losses,
        "seconds": time.perf_counter() - start,
        "tokens": protocol.base_steps * protocol.batch * protocol.seq_len,
    }
    return save(model, tokenizer, out, record)


def train_instruct(
    protocol: Protocol, data: Prepared, base: Path, out: Path, cache_dir: Path, log: Callable[[str], None]
) -> Path:
    tokenizer = load_tokenizer(base)
    text = packed([data.path("base.jsonl")], tokenizer, protocol.seq_len, cache_dir)
    rows = pack_items(data.cloze("sft-en"), protocol.answer_form, tokenizer, protocol.seq_len)
    model = load_causal_lm(base)
    start = time.perf_counter()
    batches = sft_batches(text, rows, BASE_SEED + 1, protocol.batch, protocol.sft_text_rows)
    losses = train_steps(
        model,
        batches,
        Schedule(protocol.sft_steps, protocol.sft_lr),
        lambda message: log(f"I: {message}"),
        split_loss(protocol.sft_text_rows),
    )
    record = {"losses": losses, "seconds": time.perf_counter() - start, "task_rows": len(rows)}
    return save(model, tokenizer, out, record)
