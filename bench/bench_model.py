"""Model-level throughput: the upcycled MoE next to the dense model it came from, in one run.

Both models step alternately (ten rounds after a warm-up); the summary shows the MoE's median step
time as a ratio to the dense model's. On CUDA the sizes are realistic (bf16, Triton experts); on
CPU they are tiny so the suite stays usable. Reported, not asserted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from harness import CUDA, DEVICE, MODEL_SIZES, Row, interleaved, record, scratch, sync
from transformers import AutoModelForCausalLM

from pdmoe.tiny import build_tiny_dense
from pdmoe.upcycle import upcycle

DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCH, SEQ = (8, 1024) if CUDA else (2, 128)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Iterator[dict[str, Path]]:
    with scratch(tmp_path_factory, "bench-model") as root:
        dense = build_tiny_dense(root / "dense", "llama", **MODEL_SIZES)
        yield {"dense": dense, "moe": upcycle(dense, root / "moe", num_experts=4, top_k=2)}


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_model_throughput(checkpoints, mode):
    tokens = torch.randint(0, 256, (BATCH, SEQ), device=DEVICE)

    def stepper(kind: str):
        model = AutoModelForCausalLM.from_pretrained(
            checkpoints[kind], dtype=DTYPE, trust_remote_code=False
        ).to(DEVICE)
        model.train(mode == "forward_backward")

        def step() -> None:
            if mode == "forward":
                with torch.no_grad():
                    model(tokens)
            else:
                model(tokens, labels=tokens).loss.backward()
            sync()

        step()  # warm-up: kernels compiled, caches filled
        return step

    seconds = interleaved({kind: stepper(kind) for kind in ("dense", "moe")}, 10)
    group = f"model {mode} ({'cuda bf16' if CUDA else 'cpu fp32'}, {BATCH}x{SEQ} tokens)"
    record(Row(group, "upcycled MoE step", tuple(seconds["moe"]), "dense", tuple(seconds["dense"])))
