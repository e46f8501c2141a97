"""The Switch-Transformer load-balancing loss, averaged over MoE layers, padding masked.

Convention: f_e counts each of a token's k routing slots as 1/k, so the loss is 1 at perfect
balance whatever k is (the Switch Transformer form). transformers' ``load_balancing_loss_func``
and MoE-LPR's code count every slot as 1: their value is k times this one, so their coefficient
0.01 pushes as hard as 0.01·k here. The default coefficient (``pdmoe.config.reference_aux_coef``)
is that equivalent of the reference recipe's 0.01: 0.02 at top-2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """E · Σ_e f_e · P_e per layer, averaged over layers.

    f_e is the fraction of routed (token, slot) pairs sent to expert e (no gradient, as in Switch),
    P_e the mean router probability of e; both over real tokens only when a [B, S] mask is given.
    """
    losses = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).sum(dim=1).float()
        if (
            attention_mask is not None
            and attention_mask.dim() == 2
            and attention_mask.numel() == logits.shape[0]
        ):
            keep = attention_mask.reshape(-1, 1).to(probs.dtype)
            count = keep.sum().clamp_min(1.0)
            fraction = (chosen * keep).sum(0) / (count * top_k)
            mean_prob = (probs * keep).sum(0) / count
        else:
            fraction = chosen.mean(0) / top_k
            mean_prob = probs.mean(0)
        losses.append(num_experts * torch.sum(fraction * mean_prob))
    return torch.stack(losses).mean()
