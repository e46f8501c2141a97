"""Values of command-line options shared by several commands: output dtypes and sizes."""

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
_SIZE_UNITS = {
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype by name (``bf16``, ``float32``, ...) or as is; None means "keep the input's"."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise UsageError(f"unsupported output dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count, as transformers' ``max_shard_size`` reads it."""
    if isinstance(text, int):
        return text
    upper = text.strip().upper()
    unit = next((unit for unit in _SIZE_UNITS if upper.endswith(unit)), None)
    number, factor = (upper[: -len(unit)], _SIZE_UNITS[unit]) if unit else (upper.rstrip("B"), 1)
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise UsageError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise UsageError(f"shard size must be positive, got {text!r}")
    return size
