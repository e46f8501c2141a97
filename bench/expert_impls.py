"""The expert-MLP implementations the kernel benchmarks compare, on one transformers experts module.

* ``pdmoe``        — the Triton kernels (``moe_mlp``), plain ragged GEMMs dispatched as dispatch.py says,
* ``pdmoe-triton`` — the same with every GEMM on pdmoe's own kernels (``GROUPED_MM_RULES`` all off),
* ``loop``         — transformers' eager experts forward (one GEMM pair per expert),
* ``grouped_mm``   — transformers' ``torch._grouped_mm`` experts path,
* ``reference``    — pdmoe's PyTorch reference (the CPU path).

Shared by ``bench_kernels.py`` (pytest-benchmark) and ``gpu_table.py`` (the first-contact table).
FLOPs of one call: forward 6·T·k·H·F (gate_up 4·T·k·H·F + down 2·T·k·H·F), forward+backward 3×.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import MixtralConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from pdmoe.kernels import dispatch, moe_mlp_reference  # importing the package registers "pdmoe"
from pdmoe.kernels.testing import random_routing

Shape = tuple[int, int, int, int]  # (H, F, E, k)


def make_experts(shape: Shape, device: torch.device, dtype: torch.dtype) -> MixtralExperts:
    """A transformers experts module of ``shape`` with random weights scaled by 1/sqrt(fan-in)."""
    H, F, E, k = shape
    config = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k)
    with torch.device("meta"):
        module = MixtralExperts(config)
    g = torch.Generator(device=device).manual_seed(0)
    module.gate_up_proj = torch.nn.Parameter(
        torch.randn(E, 2 * F, H, device=device, dtype=dtype, generator=g) * H**-0.5
    )
    module.down_proj = torch.nn.Parameter(
        torch.randn(E, H, F, device=device, dtype=dtype, generator=g) * F**-0.5
    )
    return module


def random_inputs(
    T: int, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], topk_ids [T, k], topk_weights [T, k]): fresh random values, never zeros."""
    H, _, E, k = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(device, dtype)
    ids = random_routing(T, E, k, generator=g, device=device)
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1).to(device, dtype)
    return hidden, ids, weights


@contextlib.contextmanager
def own_kernels_only() -> Iterator[None]:
    """Every ragged GEMM on pdmoe's Triton kernels, whatever the dispatch table says."""
    saved = dict(dispatch.GROUPED_MM_RULES)
    dispatch.GROUPED_MM_RULES.update(dict.fromkeys(saved))
    try:
        yield
    finally:
        dispatch.GROUPED_MM_RULES.update(saved)


def run_impl(experts: MixtralExperts, impl: str, hidden, ids, weights) -> torch.Tensor:
    """One experts forward with ``impl`` (see the module docstring), called directly rather than through
    the config switch; ``pdmoe-triton`` must run under ``own_kernels_only()``."""
    if impl == "reference":
        return moe_mlp_reference(hidden, experts.gate_up_proj, experts.down_proj, weights, ids)
    if impl == "loop":
        return type(experts).forward.__wrapped__(experts, hidden, ids, weights)
    return ALL_EXPERTS_FUNCTIONS[impl.partition("-")[0]](experts, hidden, ids, weights)


def expert_flops(T: int, shape: Shape, backward: bool) -> int:
    H, F, _, k = shape
    return 6 * T * k * H * F * (3 if backward else 1)


def active_weight_bytes(experts: MixtralExperts, ids: torch.Tensor) -> int:
    """Bytes of the expert weights a forward over ``ids`` must read at least once (decode's floor)."""
    _, two_f, H = experts.gate_up_proj.shape
    return ids.unique().numel() * 3 * H * (two_f // 2) * experts.down_proj.element_size()
