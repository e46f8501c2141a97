"""The language-prior routing (LPR) loss of the review stage (MoE-LPR).

The load-balancing loss of the CPT objective is ``pdmoe.load_balancing.load_balancing_loss``
(returned by the model as ``aux_loss``); this module adds only what the review stage needs.

Convention: the loss is −log p_0, whose gradient with respect to the router logits is p − e_0.
MoE-LPR's code applies cross-entropy to the router *probabilities* (a second softmax), whose
gradient is (diag(p) − p pᵀ)(softmax(p) − e_0): about p_0 times as large, i.e. 4x weaker than
−log p_0 at uniform routing over 4 experts, 5x at p_0 = 0.2, 19x at p_0 = 0.05 (it fades exactly
where original-language tokens have left expert 0). The default coefficient 0.02 (``settings.DEFAULT_LPR_COEF``) matches MoE-LPR's
0.1 at p_0 ≈ 0.2 and pulls harder where p_0 is smaller.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Losses(NamedTuple):
    """The losses of a step, by name: the one place for their order, which every vector of them
    (summed over micro-batches, reduced over processes) follows; ``metrics.jsonl`` keys are these names."""

    loss: torch.Tensor  # lm_loss + aux_coef·aux_loss + lpr_coef·lpr_loss, what is minimised
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor  # load balancing
    lpr_loss: torch.Tensor  # language-prior routing (review stage; zero otherwise)

    def vector(self) -> torch.Tensor:
        """The losses, detached, as one float64 vector in field order."""
        return torch.stack(self).detach().double()

    @classmethod
    def zeros(cls, device: torch.device) -> torch.Tensor:
        """A float64 vector of zeros to sum ``vector()`` into."""
        return torch.zeros(len(cls._fields), dtype=torch.float64, device=device)

    @classmethod
    def named(cls, vector: torch.Tensor) -> dict[str, float]:
        """A vector of losses (``vector()`` or a sum of them) as ``{name: value}``."""
        return dict(zip(cls._fields, vector.tolist(), strict=True))


def language_prior_loss(
    router_logits: tuple[torch.Tensor, ...], is_original: torch.Tensor, num_original_experts: int = 1
) -> torch.Tensor:
    """Mean over original-language tokens and MoE layers of −log p_orig, p = router softmax.

    p_orig is the probability of expert 0 (of experts 0..n-1 together when n > 1 experts are the
    original ones), so the loss pulls original-language tokens back to the unchanged dense FFN.
    ``is_original`` is a bool mask over the flattened [B*S] tokens. Without any original-language
    token the loss is a zero that still depends on the logits (every process runs the same graph).
    """
    mask = is_original.reshape(-1)
    count = mask.sum()
    losses = []
    for logits in router_logits:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_p_orig = torch.logsumexp(log_probs[:, :num_original_experts], dim=-1)
        losses.append(-(log_p_orig * mask).sum() / count.clamp_min(1))
    return torch.stack(losses).mean()
