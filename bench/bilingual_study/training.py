"""The dense models' training: pre-training of B, SFT of I, and the dense CPT arms.

The MoE arms train through ``pdmoe.cpt.train``; the dense CPT loop here follows the very same
recipe so that the arms differ only in what they train: the same packed sequences in the same
order (``SequenceOrder`` with the run's seed, ``batch`` sequences per step), AdamW with betas
(0.9, 0.95) and no weight decay, warmup over 1 % of the steps then cosine to 10 % of the peak,
gradient clipping at 1.0, float32.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from pdmoe.cpt.data import CorpusSpec, PackedSequences, SequenceOrder, TokenCache, corpus_spec

from .cloze import AnswerForm, ClozeItem
from .corpus import NEW, ORIGINAL
from .protocol import ModelSize

IGNORE = -100
Batch = tuple[torch.Tensor, torch.Tensor]  # input ids, labels


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0

    @property
    def warmup(self) -> int:
        return self.steps // 100  # pdmoe cpt's default


def corpus(paths: Sequence[Path]) -> CorpusSpec:
    return corpus_spec(paths, None, [ORIGINAL], [NEW])


def packed(paths: Sequence[Path], tokenizer, seq_len: int, cache_dir: Path) -> PackedSequences:
    return PackedSequences(TokenCache.build(corpus(paths), tokenizer, cache_dir), seq_len)


def new_model(size: ModelSize, tokenizer: PreTrainedTokenizerFast, seq_len: int, seed: int):
    config = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=4 * seq_len,  # room for long task prompts at evaluation
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over every labelled token."""
    return model(input_ids=input_ids, labels=labels).loss


def split_loss(text_rows: int) -> LossFn:
    """Mean loss over the text rows' tokens + mean loss over the task rows' answer tokens.

    One mean over all tokens would give the answers (a word and EOS per example, against 128
    tokens per text row) a few percent of the signal, and the task would barely be learned.
    """

    def loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=input_ids).logits[:, :-1]
        targets = labels[:, 1:]
        per_token = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
        ).view(targets.shape)
        counted = targets != IGNORE
        text = per_token[:text_rows][counted[:text_rows]].mean()
        return text + per_token[text_rows:][counted[text_rows:]].mean()

    return loss


def train_steps(
    model: torch.nn.Module,
    batch_of_step: Callable[[int], Batch],
    schedule: Schedule,
    log: Callable[[str], None] | None = None,
    loss_fn: LossFn = lm_loss,
) -> list[float]:
    """Train every parameter that requires grad; returns the loss of every step (``log`` hears of
    every tenth of the run)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, schedule.warmup, schedule.steps, min_lr_rate=schedule.min_lr_ratio
    )
    losses = []
    for step in range(schedule.steps):
        input_ids, labels = batch_of_step(step)
        loss = loss_fn(model, input_ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, schedule.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, schedule.steps // 10) == 0:
            log(f"step {step + 1}/{schedule.steps}, loss {losses[-1]:.3f}")
    model.eval()
    return losses


def text_batches(sequences: PackedSequences, seed: int, batch: int) -> Callable[[int], Batch]:
    """Step -> the step's sequences, in pdmoe cpt's order for the same seed and batch size."""
    order = SequenceOrder(len(sequences), seed)

    def batch_of_step(step: int) -> Batch:
        input_ids, _ = sequences.batch(order.take(step * batch, batch))
        return input_ids, input_ids

    return batch_of_step


def pack_items(items: Sequence[ClozeItem], form: AnswerForm, tokenizer, seq_len: int) -> list[Batch]:
    """Task examples packed into rows: EOS, then prompt + answer + EOS per example; loss on the answers.
    An example longer than a row is left out."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows: list[Batch] = []
    ids, labels = [eos], [IGNORE]
    for item in items:
        prompt = tokenizer(item.prompt(form), add_special_tokens=False)["input_ids"]
        answer = tokenizer(item.completion(form), add_special_tokens=False)["input_ids"] + [eos]
        if 1 + len(prompt) + len(answer) > seq_len:
            continue
        if len(ids) + len(prompt) + len(answer) > seq_len:
            rows.append(_padded(ids, labels, seq_len, pad))
            ids, labels = [eos], [IGNORE]
        ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    rows.append(_padded(ids, labels, seq_len, pad))
    return rows


def _padded(ids: list[int], labels: list[int], seq_len: int, pad: int) -> Batch:
    missing = seq_len - len(ids)
    return torch.tensor(ids + [pad] * missing), torch.tensor(labels + [IGNORE] * missing)


def sft_batches(
    text: PackedSequences, task_rows: Sequence[Batch], seed: int, batch: int, text_rows: int
) -> Callable[[int], Batch]:
    """Each step: ``text_rows`` rows of ordinary text (all tokens count) + task rows (answers count)."""
    order = SequenceOrder(len(text), seed)
    task_order = SequenceOrder(len(task_rows), seed + 1)
    task_per_step = batch - text_rows

    def batch_of_step(step: int) -> Batch:
        input_ids, _ = text.batch(order.take(step * text_rows, text_rows))
        rows = [task_rows[i] for i in task_order.take(step * task_per_step, task_per_step)]
        ids = torch.cat([input_ids, torch.stack([r[0] for r in rows])])
        labels = torch.cat([input_ids, torch.stack([r[1] for r in rows])])
        return ids, labels

    return batch_of_step


def save(model, tokenizer, out: Path, log: dict | None = None) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if log is not None:
        (out / "training.json").write_text(json.dumps(log) + "\n")
    return out
