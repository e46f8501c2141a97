"""The kernels as transformers experts implementations: ``"pdmoe"`` and ``"pdmoe_auto"``.

After ``import pdmoe``, any transformers MoE whose experts module uses the fused layout
(``gate_up_proj`` [E, 2F, H] with gate first, ``down_proj`` [E, H, F], SiLU gate, no bias — Mixtral,
Qwen2-MoE, Qwen3-MoE, pdmoe's own ``MoEExperts``, ...) runs on these kernels with
``from_pretrained(..., experts_implementation="pdmoe")`` or ``model.set_experts_implementation("pdmoe")``:
  * ``"pdmoe"``      — the Triton kernels wherever Triton runs (CUDA tensors, or any tensor under the
                       Triton interpreter), the PyTorch reference elsewhere;
  * ``"pdmoe_auto"`` — pdmoe's default: the kernels on CUDA when Triton is installed, the module's own
                       eager forward elsewhere (CPU runs stay fast even where the interpreter is on).
The names are added to ``ExpertsInterface``'s class-wide mapping, which is what transformers validates
``experts_implementation`` against (``ALL_EXPERTS_FUNCTIONS.keys()``). An experts module that keeps
its experts split into a frozen and a trainable part (pdmoe's ``MoEExperts`` during CPT) exposes them
through ``expert_weights()``; both functions pass the pair to the kernels as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .reference import ExpertWeights, moe_mlp_reference

NAME = "pdmoe"
AUTO_NAME = "pdmoe_auto"


def kernels_run_on(hidden: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``hidden``: a CUDA tensor, or anything when interpreting."""
    return hidden.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def expert_weights(module: torch.nn.Module) -> tuple[ExpertWeights, ExpertWeights]:
    """(gate_up, down) of an experts module: (frozen, trainable) pairs from a module that keeps its
    experts split (it defines ``expert_weights()``), else its fused tensors."""
    split = getattr(module, "expert_weights", None)
    return split() if split is not None else (module.gate_up_proj, module.down_proj)


def _cast(weights: ExpertWeights, dtype: torch.dtype) -> ExpertWeights:
    if isinstance(weights, tuple):
        return weights[0].to(dtype), weights[1].to(dtype)
    return weights.to(dtype)


def _check_supported(module: torch.nn.Module) -> None:
    unsupported = (
        not getattr(module, "has_gate", True)
        or getattr(module, "has_bias", False)
        or getattr(module, "is_transposed", False)
        or not getattr(module, "is_concatenated", True)
        or getattr(module, "has_post_expert_norm", False)
        or getattr(getattr(module, "config", None), "hidden_act", "silu") not in ("silu", "swish")
    )
    if unsupported:
        raise NotImplementedError(
            f"experts_implementation='{NAME}' needs fused [gate; up] SiLU experts without bias "
            f"in the [E, 2F, H] / [E, H, F] layout; {type(module).__name__} is not"
        )


def make_experts_forward(moe_mlp: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The ``"pdmoe"`` function: ``moe_mlp`` where Triton runs (``kernels_run_on``), the reference elsewhere."""

    def pdmoe_experts_forward(
        self: torch.nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        _check_supported(self)
        gate_up, down = expert_weights(self)
        dtype = (gate_up[0] if isinstance(gate_up, tuple) else gate_up).dtype
        autocast = torch.is_autocast_enabled(hidden_states.device.type)  # moe_mlp casts by itself then
        if dtype != hidden_states.dtype and not autocast:
            gate_up, down = _cast(gate_up, hidden_states.dtype), _cast(down, hidden_states.dtype)
        fn = moe_mlp if kernels_run_on(hidden_states) else moe_mlp_reference
        return fn(hidden_states, gate_up, down, top_k_weights, top_k_index)

    return pdmoe_experts_forward


def make_auto_experts_forward(
    kernels_forward: Callable[..., torch.Tensor], kernels_available: bool
) -> Callable[..., torch.Tensor]:
    """The ``"pdmoe_auto"`` function, the one "auto" rule: ``kernels_forward`` on CUDA (when Triton is
    installed), the experts module's own eager forward elsewhere."""

    def pdmoe_auto_experts_forward(
        self: torch.nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        if hidden_states.is_cuda and kernels_available:
            return kernels_forward(self, hidden_states, top_k_index, top_k_weights)
        eager = type(self).forward.__wrapped__  # what transformers' use_experts_implementation wrapped
        return eager(self, hidden_states, top_k_index, top_k_weights)

    return pdmoe_auto_experts_forward


def register_transformers_experts(
    moe_mlp: Callable[..., torch.Tensor], kernels_available: bool = True
) -> bool:
    """Register ``"pdmoe"`` and ``"pdmoe_auto"`` with transformers; False where this transformers has no
    experts interface."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    kernels_forward = make_experts_forward(moe_mlp)
    ExpertsInterface.register(NAME, kernels_forward)
    ExpertsInterface.register(AUTO_NAME, make_auto_experts_forward(kernels_forward, kernels_available))
    return True
