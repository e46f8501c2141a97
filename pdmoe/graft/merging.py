"""Data-free merging of task vectors (task arithmetic, TIES, DARE), on blocks of elements.

A task vector is τ_t = θ_t − θ_BASE for t = CPT and INSTRUCT, with weights w = (1, α). A *unit* is
the span of elements that is trimmed or dropped as one: a whole dense tensor, or, in an MoE layer,
one expert's rows of a fused expert tensor that stand for one dense tensor (gate rows, up rows,
down); that expert's CPT task vector is W_e,CPT − W_FFN,BASE and the INSTRUCT task vector is the
layer's dense FFN delta, the same for every expert. Per element of a unit, the merged delta is

    task arithmetic   Σ_t w_t τ_t                                    (Ilharco et al. 2023)
    TIES              τ̂_t = τ_t trimmed to its ⌊density·n⌋ largest magnitudes in the unit;
                      γ = sgn(Σ_t w_t τ̂_t);  Σ_{t: sgn τ̂_t = γ} w_t τ̂_t / Σ_{t: sgn τ̂_t = γ} w_t
                      (0 where no τ̂_t agrees; with w = 1 the disjoint mean)   (Yadav et al. 2023)
    DARE              Σ_t w_t · m_t ⊙ τ_t / density,  m_t ~ Bernoulli(density)   (Yu et al. 2023)

and the output is θ_BASE + merged delta. (mergekit's ``ties`` and ``dare_linear`` compute the same,
except that mergekit elects + where the weighted sum is exactly 0, and breaks ties in the trim
arbitrarily.)

No I/O here. Both sparsifiers give the same result however a unit is cut into blocks, so a tensor
of any size is merged in bounded memory: TIES's threshold is found exactly by a radix select over
the bits of |τ| (16-bit histograms, one pass over the unit per 16 bits of the dtype), elements equal
to the threshold are kept in index order; DARE draws the mask of element i from a generator seeded
by (seed, unit, i // DARE_CHUNK).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from pdmoe.graft.methods import MergeSpec

DARE_CHUNK = 2**16
_DIGIT_BITS = 16
_BITS_DTYPE = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}
_BITS_DTYPE[torch.float16] = torch.int16


# --- TIES: the per-unit magnitude threshold, exact in bounded memory ---------------------------


@dataclass(frozen=True)
class MagnitudeThreshold:
    """Keep the elements with |x| above ``bits`` (as an integer view of |x|) and the first ``ties``
    elements, in index order, with |x| equal to it. ``bits`` = -1 keeps everything."""

    bits: int
    ties: int


KEEP_ALL = MagnitudeThreshold(bits=-1, ties=0)


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """|x| as integers of the same width: for non-negative floats their order is the integer order."""
    if values.dtype not in _BITS_DTYPE:
        raise TypeError(f"magnitudes of {values.dtype} are not supported")
    return values.abs().view(_BITS_DTYPE[values.dtype]).to(torch.int64)


def magnitude_threshold(
    blocks: Callable[[], Iterable[torch.Tensor]], numel: int, density: float
) -> MagnitudeThreshold:
    """The threshold that keeps the ⌊density·numel⌋ largest magnitudes of a unit.

    ``blocks()`` must yield the unit's values (1-D blocks, in index order, one float dtype); it is
    called once per 16 bits of that dtype (2 passes for float32, 4 for float64), each pass keeping
    one 65536-bin histogram: radix select, most significant digit first.
    """
    keep = int(density * numel)
    if keep >= numel:
        return KEEP_ALL
    if keep == 0:
        return MagnitudeThreshold(bits=torch.iinfo(torch.int64).max, ties=0)
    width: int | None = None
    prefix, need, shift = 0, keep, None
    while shift is None or shift > 0:
        histogram = torch.zeros(2**_DIGIT_BITS, dtype=torch.int64)
        for block in blocks():
            if width is None:
                width = 8 * block.element_size()
            bits = magnitude_bits(block.reshape(-1))
            current = width - _DIGIT_BITS if shift is None else shift - _DIGIT_BITS
            if shift is not None:
                bits = bits[(bits >> shift) == prefix]
            histogram += torch.bincount((bits >> current) & (2**_DIGIT_BITS - 1), minlength=2**_DIGIT_BITS)
        if width is None:
            raise ValueError("magnitude_threshold: blocks() yielded nothing")
        shift = width - _DIGIT_BITS if shift is None else shift - _DIGIT_BITS
        above = torch.flip(histogram, [0]).cumsum(0).flip([0])  # above[d] = count of digits >= d
        digit = int(torch.nonzero(above >= need).max())
        need -= int(above[digit + 1]) if digit + 1 < len(above) else 0
        prefix = (prefix << _DIGIT_BITS) | digit
    return MagnitudeThreshold(bits=prefix, ties=need)


class Trim:
    """The keep mask of one unit's blocks, fed in index order (the tie budget is spent in order)."""

    def __init__(self, threshold: MagnitudeThreshold) -> None:
        self.threshold = threshold
        self.ties_left = threshold.ties

    def mask(self, block: torch.Tensor) -> torch.Tensor:
        bits = magnitude_bits(block)
        keep = bits > self.threshold.bits
        if self.ties_left:
            equal = bits == self.threshold.bits
            keep |= equal & (equal.reshape(-1).cumsum(0).view(equal.shape) <= self.ties_left)
            self.ties_left = max(0, self.ties_left - int(equal.sum()))
        return keep


# --- DARE: a drop mask that does not depend on how the unit is cut into blocks -----------------


def _chunk_seed(seed: int, unit: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{unit}\0{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare_keep_mask(seed: int, unit: str, start: int, count: int, density: float) -> torch.Tensor:
    """Bernoulli(density) keep mask of elements [start, start + count) of ``unit`` (bool, 1-D)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.bool)
    first, last = start // DARE_CHUNK, (start + count - 1) // DARE_CHUNK
    draws = []
    for chunk in range(first, last + 1):
        generator = torch.Generator().manual_seed(_chunk_seed(seed, unit, chunk))
        draws.append(torch.rand(DARE_CHUNK, generator=generator))
    offset = start - first * DARE_CHUNK
    return torch.cat(draws)[offset : offset + count] < density


# --- combining the task vectors of one block -----------------------------------------------------


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask``, else 0 (a new tensor): a trimmed or dropped task vector."""
    return torch.where(mask, values, 0)


def task_arithmetic(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_t w_t τ_t (a new tensor)."""
    merged = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        merged.add_(delta, alpha=weight)
    return merged


def ties_merge(trimmed: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Elect the sign of Σ_t w_t τ̂_t, then the weighted mean of the τ̂_t of that sign (0 if none)."""
    elected = torch.sign(task_arithmetic(trimmed, weights))
    numerator = torch.zeros_like(trimmed[0])
    denominator = torch.zeros_like(trimmed[0])
    for delta, weight in zip(trimmed, weights, strict=True):
        agree = (torch.sign(delta) == elected) & (delta != 0)
        numerator += torch.where(agree, delta * weight, 0)
        denominator += agree.to(denominator.dtype) * weight
    return torch.where(
        denominator > 0, numerator / denominator.clamp_min(torch.finfo(numerator.dtype).tiny), 0
    )


def dare_merge(
    deltas: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], weights: Sequence[float], density: float
) -> torch.Tensor:
    """Σ_t w_t · m_t ⊙ τ_t / density."""
    merged = torch.zeros_like(deltas[0])
    for delta, mask, weight in zip(deltas, masks, weights, strict=True):
        merged += torch.where(mask, delta, 0) / density * weight
    return merged


def merge_units(
    spec: MergeSpec,
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    weights: Sequence[float],
    units: Sequence[str],
) -> torch.Tensor:
    """θ_BASE + merged delta for whole units held in memory (``tuned[t]`` is θ_t, ``units[t]`` names
    τ_t's unit for DARE); the streaming graft applies the same functions block by block."""
    spec.check_weights(weights)
    deltas = [t.to(base.dtype) - base for t in tuned]
    return base + spec.strategy.merge_deltas(spec, deltas, weights, units)
