"""Every setting of the study in one place: the full protocol and the quick smoke-test variant.

FULL was fixed before its first run and is what bench/study_results/ reports; changing any value
here changes the cache key, so a rerun into the same DIR recomputes everything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Protocol:
    name: str
    model: ModelSize
    seq_len: int
    batch: int  # sequences per optimizer step, for every training stage
    spanish_share: float  # of the base model's pre-training tokens
    base_steps: int
    base_lr: float
    sft_steps: int
    sft_lr: float
    sft_text_rows: int  # of the batch's rows: ordinary text, the rest packed task examples
    sft_items: int
    cpt_steps: int
    dense_lrs: tuple[float, ...]
    moe_lrs: tuple[float, ...]
    num_experts: int
    top_k: int
    aux_coef: float  # pdmoe's Switch-form load-balancing loss (see README, loss conventions)
    review_steps: int
    review_lr: float
    lpr_coef: float  # pdmoe's −log p0 language-prior loss
    review_tokens_share: float  # of CPT tokens, half original and half new language
    ties_density: float
    dare_density: float
    seeds: tuple[int, ...]
    eval_sequences: int  # per language
    cloze_items: int  # per language
    threads: int  # per worker process
    workers: int
    foundation_threads: int  # base and instruct model: one job at a time, so both cores

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Protocol(
    name="full",
    model=ModelSize(hidden=128, layers=4, heads=4, intermediate=384, vocab=4096),
    seq_len=128,
    batch=16,
    spanish_share=0.15,
    base_steps=2000,
    base_lr=2e-3,
    sft_steps=600,
    sft_lr=3e-3,
    sft_text_rows=4,
    sft_items=6000,
    cpt_steps=200,
    dense_lrs=(3e-4, 1e-3, 3e-3),
    moe_lrs=(3e-4, 1e-3, 3e-3),
    num_experts=4,
    top_k=2,
    aux_coef=0.02,
    review_steps=30,
    review_lr=1e-3,
    lpr_coef=0.02,
    review_tokens_share=0.15,
    ties_density=0.2,
    dare_density=0.5,
    seeds=(0, 1, 2),
    eval_sequences=96,
    cloze_items=200,
    threads=1,
    workers=2,
    foundation_threads=2,
)

QUICK = Protocol(
    name="quick",
    model=ModelSize(hidden=32, layers=2, heads=2, intermediate=64, vocab=1024),
    seq_len=128,
    batch=8,
    spanish_share=0.15,
    base_steps=30,
    base_lr=3e-3,
    sft_steps=10,
    sft_lr=1e-3,
    sft_text_rows=4,
    sft_items=60,
    cpt_steps=8,
    dense_lrs=(1e-3, 3e-3),
    moe_lrs=(1e-3, 3e-3),
    num_experts=4,
    top_k=2,
    aux_coef=0.02,
    review_steps=3,
    review_lr=1e-3,
    lpr_coef=0.02,
    review_tokens_share=0.5,
    ties_density=0.2,
    dare_density=0.5,
    seeds=(0, 1),
    eval_sequences=8,
    cloze_items=12,
    threads=1,
    workers=2,
    foundation_threads=1,
)
