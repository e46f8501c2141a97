"""Training FLOPs per token, for the dense baseline matched to the MoE recipe's training compute.

Counted as 2 FLOPs per multiply-add of every matrix product: the forward pass, the gradients
with respect to activations (as many as the forward, through every layer), and the gradients of
the weights that train. For the MoE the count is an upper bound that favours the dense baseline:
both of a token's top-k slots are assumed to go to trainable (new) experts.
"""

from __future__ import annotations

from .protocol import ModelSize


def _forward_macs(size: ModelSize, seq_len: int, active_ffns: int, router: bool, num_experts: int) -> float:
    context = (seq_len + 1) / 2  # mean causal context
    layer = 4 * size.hidden**2 + 2 * size.hidden * context + active_ffns * 3 * size.hidden * size.intermediate
    if router:
        layer += size.hidden * num_experts
    return size.layers * layer + size.hidden * size.vocab


def dense_cpt_flops(size: ModelSize, seq_len: int) -> float:
    """Every weight trains."""
    forward = _forward_macs(size, seq_len, 1, False, 0)
    weights = (
        size.layers * (4 * size.hidden**2 + 3 * size.hidden * size.intermediate) + size.hidden * size.vocab
    )
    return 2 * (2 * forward + weights)


def moe_cpt_flops(size: ModelSize, seq_len: int, num_experts: int, top_k: int) -> float:
    """New experts and routers train; everything else is frozen."""
    forward = _forward_macs(size, seq_len, top_k, True, num_experts)
    weights = size.layers * (top_k * 3 * size.hidden * size.intermediate + size.hidden * num_experts)
    return 2 * (2 * forward + weights)


def review_flops(size: ModelSize, seq_len: int, num_experts: int, top_k: int) -> float:
    """Routers only."""
    forward = _forward_macs(size, seq_len, top_k, True, num_experts)
    return 2 * (2 * forward + size.layers * size.hidden * num_experts)
