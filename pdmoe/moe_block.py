"""The MoE block that replaces a dense decoder layer's MLP."""

from __future__ import annotations

import torch
from torch import nn

from pdmoe.config import MoEConfig
from pdmoe.experts import MoEExperts
from pdmoe.router import TopKRouter


class MoEBlock(nn.Module):
    """Router + experts, with the dense MLP's call signature ([B, S, H] -> [B, S, H]).

    The dense decoder layer only knows ``mlp(x) -> y``, so the router logits of the last call are
    kept on the block for the model to collect (load-balancing loss, routing analysis).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.gate = TopKRouter(
            config.hidden_size, config.num_experts, config.num_experts_per_tok, config.norm_topk_prob
        )
        self.experts = MoEExperts(config)
        self.router_logits: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        self.router_logits, topk_weights, topk_ids = self.gate(tokens)
        return self.experts(tokens, topk_ids, topk_weights).reshape(shape)

    def pop_router_logits(self) -> torch.Tensor:
        logits, self.router_logits = self.router_logits, None
        if logits is None:
            raise RuntimeError("MoEBlock.pop_router_logits called before a forward pass")
        return logits
