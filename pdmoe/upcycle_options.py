"""The options of an upcycle, written once: ``pdmoe upcycle`` builds them from its flags (its
defaults and help defaults read from here), a Python caller passes them to ``pdmoe.upcycle.upcycle``.

Apart from ``pdmoe.upcycle`` because that module loads torch: the command line reads these
defaults before torch loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdmoe.options import DEFAULT_SHARD_SIZE

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class UpcycleOptions:
    """How to upcycle; the output marker records them as ``upcycle`` resolved them."""

    num_experts: int = 4  # experts per MoE layer
    top_k: int = 2  # experts per token
    layers: str | Sequence[int] = "all"  # 'all', a list like '0,2,5' or [0, 2, 5], or 'every:N'
    router_init_std: float | None = None  # None: the dense config's initializer_range (0.02 when absent)
    seed: int = 0  # of the router init
    dtype: str | torch.dtype | None = None  # None: each dense tensor's own
    shard_size: str | int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    allow_non_finite: bool = False  # copy NaN / inf values instead of refusing them


DEFAULT_OPTIONS = UpcycleOptions()
