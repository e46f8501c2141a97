"""Random inputs for tests and benchmarks of the expert computation (fresh values, never zeros)."""

from __future__ import annotations

import torch


def random_routing(
    n_tokens: int,
    n_experts: int,
    top_k: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """topk_ids [T, k] int64: k distinct experts per token, uniformly at random."""
    scores = torch.rand(n_tokens, n_experts, generator=generator)
    return scores.argsort(dim=1)[:, :top_k].to(device)


def random_moe_inputs(
    n_tokens: int,
    hidden: int,
    ffn: int,
    n_experts: int,
    top_k: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    topk_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], gate_up_proj [E, 2F, H], down_proj [E, H, F], topk_weights [T, k], topk_ids [T, k]).

    Weights are scaled by 1/sqrt(fan-in) so activations stay O(1); routing weights are positive and
    sum to 1 per token, like a renormalised top-k softmax.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    x = randn(n_tokens, hidden)
    gate_up = randn(n_experts, 2 * ffn, hidden, scale=hidden**-0.5)
    down = randn(n_experts, hidden, ffn, scale=ffn**-0.5)
    weights = torch.rand(n_tokens, top_k, generator=g, dtype=torch.float64) + 0.05
    weights = (weights / weights.sum(dim=1, keepdim=True)).to(dtype=dtype, device=device)
    if topk_ids is None:
        topk_ids = random_routing(n_tokens, n_experts, top_k, generator=g, device=device)
    return x, gate_up, down, weights, topk_ids.to(device)


def tiny_transformers_moes() -> dict:
    """{name: (model class, config)} of tiny random transformers MoEs with fused SiLU experts
    (Mixtral, Qwen3-MoE), for checks of the "pdmoe" experts implementation."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 64,
    }
    return {
        "mixtral": (MixtralForCausalLM, MixtralConfig(**common, intermediate_size=24, num_local_experts=4)),
        "qwen3_moe": (
            Qwen3MoeForCausalLM,
            Qwen3MoeConfig(
                **common, head_dim=8, moe_intermediate_size=24, num_experts=4, norm_topk_prob=True
            ),
        ),
    }
