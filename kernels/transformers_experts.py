"""The kernels as a transformers experts implementation named ``"pdmoe"``.

After ``import pdmoe``, any transformers MoE whose experts module uses the fused layout
(``gate_up_proj`` [E, 2F, H] with gate first, ``down_proj`` [E, H, F], SiLU gate, no bias — Mixtral,
Qwen2-MoE, Qwen3-MoE, ...) runs on these kernels with
``from_pretrained(..., experts_implementation="pdmoe")`` or ``model.set_experts_implementation("pdmoe")``.
The name is added to ``ExpertsInterface``'s class-wide mapping, which is what transformers validates
``experts_implementation`` against (``ALL_EXPERTS_FUNCTIONS.keys()``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .reference import moe_mlp_reference

NAME = "pdmoe"


def _uses_triton(hidden: torch.Tensor) -> bool:
    return hidden.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def make_experts_forward(moe_mlp: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An ``ExpertsInterface`` function running ``moe_mlp`` on CUDA (and in the Triton interpreter),
    the PyTorch reference elsewhere."""

    def pdmoe_experts_forward(
        self: torch.nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        unsupported = (
            not getattr(self, "has_gate", True)
            or getattr(self, "has_bias", False)
            or getattr(self, "is_transposed", False)
            or not getattr(self, "is_concatenated", True)
            or getattr(self, "has_post_expert_norm", False)
            or getattr(getattr(self, "config", None), "hidden_act", "silu") not in ("silu", "swish")
        )
        if unsupported:
            raise NotImplementedError(
                f"experts_implementation='{NAME}' needs fused [gate; up] SiLU experts without bias "
                f"in the [E, 2F, H] / [E, H, F] layout; {type(self).__name__} is not"
            )
        gate_up, down = self.gate_up_proj, self.down_proj
        autocast = torch.is_autocast_enabled(hidden_states.device.type)  # moe_mlp casts by itself then
        if gate_up.dtype != hidden_states.dtype and not autocast:
            gate_up, down = gate_up.to(hidden_states.dtype), down.to(hidden_states.dtype)
        fn = moe_mlp if _uses_triton(hidden_states) else moe_mlp_reference
        return fn(hidden_states, gate_up, down, top_k_weights, top_k_index)

    return pdmoe_experts_forward


def register_transformers_experts(moe_mlp: Callable[..., torch.Tensor]) -> bool:
    """Register ``"pdmoe"`` with transformers; False where this transformers has no experts interface."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(NAME, make_experts_forward(moe_mlp))
    return True
