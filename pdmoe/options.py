"""Values of command-line options shared by several commands: output dtypes, sizes, seeds, numbers.

Each is checked where the Python API receives it, so ``pdmoe CMD`` and a direct call refuse the
same values with the same message (a NaN, an infinity, a size or seed that would overflow).
No torch at import: the command line builds its parsers from here before torch loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdmoe.errors import Option, Problem, UsageError

if TYPE_CHECKING:
    import torch

# The largest output shard of every command that writes a checkpoint (upcycle, graft), as
# transformers' ``save_pretrained`` defaults it.
DEFAULT_SHARD_SIZE = "5GB"

# Dtype names as options and config.json spell them -> the name of the torch dtype.
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
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
    import torch

    if dtype is None or (isinstance(dtype, torch.dtype) and str(dtype).removeprefix("torch.") in DTYPE_NAMES):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return getattr(torch, DTYPE_NAMES[dtype.lower()])
    raise UsageError(
        "unsupported output dtype {given!r} for {dtype}; choose one of {names}",
        problem=Problem.INVALID,
        dtype=Option("dtype"),
        given=dtype,
        names=", ".join(DTYPE_NAMES),
    )


def parse_size(text: str | int, option: str = "shard_size") -> int:
    """'5GB', '500MB', '2GiB' or a byte count, as transformers' ``max_shard_size`` reads it
    (``option`` is the option's name in errors)."""
    named = Option(option)
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        upper = str(text).strip().upper()
        unit = next((unit for unit in _SIZE_UNITS if upper.endswith(unit)), None)
        number, factor = (upper[: -len(unit)], _SIZE_UNITS[unit]) if unit else (upper.rstrip("B"), 1)
        try:
            value = float(number) * factor
        except ValueError:
            raise UsageError(
                "cannot read {option} {text!r}; write it like 5GB, 500MB or 2GiB",
                problem=Problem.INVALID,
                option=named,
                text=text,
            ) from None
        if not math.isfinite(value):
            raise UsageError(
                "{option} must be a finite size like 5GB, got {text!r}",
                problem=Problem.INVALID,
                option=named,
                text=text,
            )
        size = int(value)
    if size <= 0:
        raise UsageError(
            "{option} must be positive, got {text!r}", problem=Problem.INVALID, option=named, text=text
        )
    return size


def check_number(
    option: str, value: float, *, low: float = -math.inf, high: float = math.inf, hint: str = ""
) -> float:
    """``value`` when it is a finite number in [low, high]; otherwise a UsageError naming ``option``."""
    named = Option(option)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(
            "{option} must be a number, got {value!r}", problem=Problem.INVALID, option=named, value=value
        )
    if not math.isfinite(value) or not low <= value <= high:
        if low > -math.inf and high < math.inf:
            wanted = f"a finite number in [{low:g}, {high:g}]"
        elif low > -math.inf or high < math.inf:
            wanted = f"a finite number {'>= ' + format(low, 'g') if low > -math.inf else '<= ' + format(high, 'g')}"
        else:
            wanted = "a finite number"
        raise UsageError(
            "{option} must be {wanted}, got {value!r}{hint}",
            problem=Problem.INVALID,
            option=named,
            wanted=wanted,
            value=value,
            hint=f" ({hint})" if hint else "",
        )
    return float(value)


def check_choice(option: str, value: object, choices: Sequence[str]) -> None:
    """Refuse ``value`` unless it is one of ``choices``, naming ``option`` and them."""
    if value not in choices:
        raise UsageError(
            "{option} must be one of {choices}, not {value!r}",
            problem=Problem.INVALID,
            option=Option(option),
            choices=", ".join(choices),
            value=value,
        )


SEED_RANGE = (0, 2**32 - 1)


def check_seed(seed: int, option: str = "seed") -> int:
    """A seed in 0..2**32-1 (what every random generator pdmoe seeds accepts)."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise UsageError(
            "{option} must be an integer in {low}..{high}, got {seed!r}",
            problem=Problem.INVALID,
            option=Option(option),
            low=low,
            high=high,
            seed=seed,
        )
    return seed
