"""Training throughput (forward + backward + AdamW step) of the upcycled MoE next to transformers' MoE.

The reference is ``Qwen3MoeForCausalLM`` of the same shape (an upcycled Qwen3: same attention,
norms, E experts of the same size, top-k with renormalisation) with transformers' ``grouped_mm``
experts, in the same run. Two trainable sets per model:

* ``cpt``: what ``pdmoe cpt`` trains. pdmoe: routers + new experts, expert 0 split off frozen (no
  gradient, no optimizer state). transformers has no per-expert freezing, so: routers + all experts.
* ``all``: every parameter, the like-for-like kernel comparison.

On CUDA the size is realistic (hidden 2048, 8 layers, 2 sequences of 2048 tokens; bf16 autocast over
float32 weights, as the trainer runs; pdmoe's experts use the Triton kernels); on CPU it is tiny (float32, pdmoe's experts use the PyTorch
reference). Both models step alternately (ten rounds after a warm-up; five on CUDA); the summary shows
pdmoe's median step time as a ratio to transformers'. Reported, not asserted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from harness import CUDA, DEVICE, MODEL_SIZES, Row, interleaved, record, scratch, sync
from transformers import AutoConfig, AutoModelForCausalLM

from pdmoe.cpt.freezing import apply_trainable
from pdmoe.export.formats import NativeFormat, native_config
from pdmoe.tiny import build_tiny_dense
from pdmoe.upcycle import upcycle

NUM_EXPERTS, TOP_K = 4, 2
BATCH, SEQ = (2, 2048) if CUDA else (4, 128)
SIZES = {**MODEL_SIZES, "num_hidden_layers": 8} if CUDA else MODEL_SIZES


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory) -> Iterator[Path]:
    with scratch(tmp_path_factory, "bench-cpt") as root:
        dense = build_tiny_dense(root / "dense", "qwen3", **SIZES)
        yield upcycle(dense, root / "moe", num_experts=NUM_EXPERTS, top_k=TOP_K)


def _transformers_twin(moe_config) -> torch.nn.Module:
    """transformers' own Qwen3-MoE of the upcycled model (the config ``pdmoe export`` writes for it),
    on transformers' grouped_mm experts."""
    native = native_config(moe_config.to_dict(), NativeFormat.QWEN3_MOE)
    config = AutoConfig.for_model(**{**native, "output_router_logits": True})
    return AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm")


def _freeze_like_cpt(model: torch.nn.Module) -> None:
    """transformers' MoE: routers + (all) experts train, everything else frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_(".mlp.gate." in name or ".mlp.experts." in name)


@pytest.mark.parametrize("trainable", ["cpt", "all"])
def test_training_throughput(upcycled, trainable):
    tokens = torch.randint(0, 256, (BATCH, SEQ), device=DEVICE)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else nullcontext()

    def stepper(kind: str):
        model = AutoModelForCausalLM.from_pretrained(upcycled, dtype=torch.float32, trust_remote_code=False)
        if kind != "pdmoe":
            model = _transformers_twin(model.config)
        if trainable == "cpt":
            apply_trainable(model, ("routers", "new_experts")) if kind == "pdmoe" else _freeze_like_cpt(model)
        model.to(DEVICE).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step() -> None:
            with autocast:
                loss = model(input_ids=tokens, labels=tokens, output_router_logits=True).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()

        step()  # warm-up: kernels compiled/tuned, optimizer state allocated
        return step

    kinds = ("pdmoe", "transformers_qwen3moe_grouped_mm")
    seconds = interleaved({kind: stepper(kind) for kind in kinds}, 5 if CUDA else 10)
    group = f"cpt train step, trainable={trainable} ({'cuda bf16 autocast' if CUDA else 'cpu fp32'}, {BATCH}x{SEQ})"
    record(
        Row(group, "pdmoe step", tuple(seconds[kinds[0]]), "transformers Qwen3-MoE", tuple(seconds[kinds[1]]))
    )
    tokens = BATCH * SEQ
    record(
        Row(
            group,
            "pdmoe tokens/s",
            tuple(tokens / t for t in seconds[kinds[0]]),
            "transformers Qwen3-MoE",
            tuple(tokens / t for t in seconds[kinds[1]]),
            unit="tok/s",
        )
    )
