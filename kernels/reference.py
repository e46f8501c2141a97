"""Plain-PyTorch reference of the expert computation (docs/method.md, "Contract: the expert computation").

    y_t = Σ_j w_tj · down_{ids_tj}( silu(gate_{ids_tj} x_t) ⊙ up_{ids_tj} x_t )

This is the judge for the Triton kernels (run it in float64) and the CPU training path of the model,
so it loops only over experts that received tokens and stays autograd-friendly and deterministic:
the experts' outputs are concatenated in expert-sorted slot order, permuted back to slot order (each
row written once, so no order-dependent accumulation, unlike ``index_add_`` which uses atomics on
CUDA) and the k contributions of a token are summed in slot order.

Expert weights may be one tensor or a ``(frozen, trainable)`` pair meaning their concatenation along
dim 0; the pair is never concatenated: each expert's slice is taken from the tensor that holds it, so
autograd produces gradients only for the tensors that require them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ExpertWeights = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""One [E, ...] tensor, or (frozen [E0, ...], trainable [E - E0, ...]) concatenated along dim 0."""


def split_experts(weights: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(first, second)`` of the tuple form, or ``(weights, None)`` for a single tensor."""
    if isinstance(weights, tuple | list):
        first, second = weights
        if first.shape[1:] != second.shape[1:]:
            raise ValueError(f"frozen and trainable expert shapes differ: {first.shape} vs {second.shape}")
        return first, second
    return weights, None


def num_experts(weights: ExpertWeights) -> int:
    """Number of experts of the logical [E, ...] weight."""
    first, second = split_experts(weights)
    return first.shape[0] + (0 if second is None else second.shape[0])


def expert_weight(weights: ExpertWeights, expert: int) -> torch.Tensor:
    """The logical ``weights[expert]``, sliced from whichever part holds it (no copy)."""
    first, second = split_experts(weights)
    if expert < first.shape[0]:
        return first[expert]
    assert second is not None
    return second[expert - first.shape[0]]


def sort_by_expert(flat_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots grouped by expert in slot order (a stable sort) and the token count of every expert."""
    flat_ids = flat_ids.long()
    counts = torch.bincount(flat_ids, minlength=n_experts)
    if counts.numel() > n_experts:
        raise ValueError(f"topk_ids has an expert id >= {n_experts}")
    return torch.argsort(flat_ids, stable=True), counts


def moe_mlp_reference(
    hidden: torch.Tensor,
    gate_up_proj: ExpertWeights,
    down_proj: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Expert MLP of docs/method.md in plain PyTorch: hidden [T, H] -> [T, H] in ``hidden.dtype``.

    ``gate_up_proj`` is [E, 2F, H] (gate rows first), ``down_proj`` [E, H, F], ``topk_weights`` [T, k],
    ``topk_ids`` [T, k] (int32/int64). Synchronises with the host (it asks which experts got tokens),
    so it is not CUDA-graph capturable; the Triton path is.
    """
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E = num_experts(gate_up_proj)
    if num_experts(down_proj) != E:
        raise ValueError("gate_up_proj and down_proj disagree on the number of experts")
    order, counts = sort_by_expert(topk_ids.reshape(-1), E)
    outputs, start = [], 0
    for e, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        x = hidden[order[start : start + count] // k]
        start += count
        gate, up = F.linear(x, expert_weight(gate_up_proj, e)).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate) * up, expert_weight(down_proj, e)).to(hidden.dtype))
    # Rows are in expert-sorted slot order; gathering with the inverse permutation puts every slot's
    # row back in place (each written once: no accumulation order to depend on).
    sorted_rows = torch.cat(outputs) if outputs else hidden.new_zeros(0, H)
    per_slot = sorted_rows[torch.argsort(order)]
    weighted = per_slot.view(T, k, H) * topk_weights.to(hidden.dtype).unsqueeze(-1)
    return weighted.sum(dim=1)
