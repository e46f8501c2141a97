"""Output dtypes by name, shared by every command that takes ``--dtype``."""

from __future__ import annotations

import torch

from pdmoe.errors import UsageError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype by name (``bf16``, ``float32``, ...) or as is; None means "keep the input's"."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise UsageError(f"unsupported output dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
