"""What every arm is measured on: held-out perplexity, the task, and routing, in both languages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pdmoe.cpt.data import PackedSequences
from pdmoe.cpt.evaluate import expert_shares, expert_token_counts, per_language_nll, spread_indices
from pdmoe.io.hf_loading import load_causal_lm, load_tokenizer

from .cloze import BLANK, AnswerForm, ClozeItem, score

MAX_NEW_TOKENS = 8
BATCH = 32


@dataclass
class HeldOut:
    """One language's held-out text and task items."""

    lang: str
    sequences: PackedSequences
    items: Sequence[ClozeItem]


@torch.no_grad()
def perplexity_and_routing(model, sequences: PackedSequences, count: int) -> tuple[float, float | None]:
    """exp(mean NLL) over ``count`` spread sequences, and the share of routed token slots that
    went to expert 0, averaged over MoE layers (None for a dense model)."""
    num_langs = len(sequences.cache.languages)
    config = model.config
    is_moe = getattr(config, "model_type", None) == "pdmoe"
    nll = torch.zeros(num_langs, dtype=torch.float64)
    targets = torch.zeros(num_langs, dtype=torch.int64)
    counts = None
    indices = spread_indices(len(sequences), count)
    for start in range(0, len(indices), BATCH):
        input_ids, langs = sequences.batch(indices[start : start + BATCH])
        if is_moe:
            out = model(input_ids=input_ids, output_router_logits=True)
            batch_counts = expert_token_counts(
                out.router_logits, langs, num_langs, config.num_experts_per_tok
            )
            counts = batch_counts if counts is None else counts + batch_counts
        else:
            out = model(input_ids=input_ids)
        batch_nll, batch_targets = per_language_nll(out.logits, input_ids, langs, num_langs)
        nll += batch_nll
        targets += batch_targets
    ppl = torch.exp(nll.sum() / targets.sum()).item()
    if counts is None:
        return ppl, None
    shares = expert_shares(counts.sum(dim=1))  # [layers, experts], over all tokens of this text
    return ppl, shares[:, 0].mean().item()


@torch.no_grad()
def generate_answers(model, tokenizer, items: Sequence[ClozeItem], form: AnswerForm) -> list[str | None]:
    """Greedy answers after "Answer:", cut at EOS or a newline; None where neither came."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    answers: list[str | None] = []
    for start in range(0, len(items), BATCH):
        prompts = [
            [eos, *tokenizer(i.prompt(form), add_special_tokens=False)["input_ids"]]
            for i in items[start : start + BATCH]
        ]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        for row in out[:, width:].tolist():
            stopped = eos in row
            text = tokenizer.decode(row[: row.index(eos)] if stopped else row)
            if "\n" in text:
                text, stopped = text.split("\n", 1)[0], True
            answers.append(text if stopped else None)
    return answers


@torch.no_grad()
def likelihood_choice(model_dir: Path, items: Sequence[ClozeItem]) -> float:
    """Share of ``items`` whose answer, put in the blank, gives the verse the highest likelihood
    among the listed words: how much of the task the model knows, whatever it learned to answer."""
    model = load_causal_lm(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(model_dir)
    right = 0
    for item in items:
        filled = [
            [
                tokenizer.eos_token_id,
                *tokenizer(item.text.replace(BLANK, word), add_special_tokens=False)["input_ids"],
            ]
            for word in item.choices
        ]
        width = max(len(ids) for ids in filled)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in filled])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in filled])
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
        per_token = logits.gather(2, input_ids[:, 1:, None]).squeeze(2) * mask[:, 1:]
        right += item.choices[int(per_token.sum(1).argmax())] == item.answer
    return right / len(items)


def evaluate(model_dir: Path, heldout: Sequence[HeldOut], eval_sequences: int, form: AnswerForm) -> dict:
    """{lang: {ppl, exact, format, expert0}} of the checkpoint in ``model_dir``."""
    model = load_causal_lm(model_dir, dtype=torch.float32).eval()
    model.generation_config.cache_implementation = None
    tokenizer = load_tokenizer(model_dir)
    result = {}
    for held in heldout:
        ppl, expert0 = perplexity_and_routing(model, held.sequences, eval_sequences)
        task = score(held.items, generate_answers(model, tokenizer, held.items, form), form)
        result[held.lang] = {"ppl": ppl, "exact": task.exact, "format": task.format, "expert0": expert0}
    return result
