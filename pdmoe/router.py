"""The router of an MoE layer: Linear(H, E) -> softmax -> top-k -> optional renormalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TopKRouter(nn.Module):
    """Picks k experts per token and their weights.

    Softmax runs in float32 whatever the model dtype, so routing decisions do not flip with the
    precision; with renormalisation the k weights sum to 1, which makes identical experts compute
    exactly what the dense FFN computes (docs/method.md's first invariant).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool = True) -> None:
        super().__init__()
        self.top_k = top_k
        self.normalize = normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> (logits [T, E], topk_weights [T, k] in hidden's dtype, topk_ids [T, k])."""
        logits = F.linear(hidden, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return logits, topk_weights.to(hidden.dtype), topk_ids

    def extra_repr(self) -> str:
        experts, hidden = self.weight.shape
        return f"hidden={hidden}, experts={experts}, top_k={self.top_k}, normalize={self.normalize}"
