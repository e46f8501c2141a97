"""The merge methods against references written from the papers, element by element.

TIES (Yadav et al. 2023, Algorithm 1): trim each task vector to its top-k% magnitudes, elect
γ = sgn(Σ_t τ̂_t), take the mean over the task vectors whose sign equals γ ("disjoint mean").
DARE (Yu et al. 2023): drop each delta entry with probability p, rescale the rest by 1/(1 − p),
then add the task vectors. Weights w_t generalise both as in mergekit (weighted sign election and
weighted mean for TIES, Σ w_t for DARE); with w = 1 they are the papers' formulas.
"""

from __future__ import annotations

import pytest
import torch

from pdmoe.errors import UsageError
from pdmoe.graft.merging import (
    DARE_CHUNK,
    MergeMethod,
    MergeSpec,
    Trim,
    dare_keep_mask,
    magnitude_threshold,
    merge_units,
)


def reference_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ⌊density·n⌋ entries of largest magnitude; among equal magnitudes the earlier index."""
    flat = tau.reshape(-1)
    k = int(density * flat.numel())
    ranked = sorted(range(flat.numel()), key=lambda i: (-abs(flat[i].item()), i))
    kept = torch.zeros_like(flat)
    for i in ranked[:k]:
        kept[i] = flat[i]
    return kept.view_as(tau)


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def reference_ties(base, tuned, weights, density):
    trimmed = [reference_trim(t - base, density).reshape(-1) for t in tuned]
    out = base.clone().reshape(-1)
    for p in range(out.numel()):
        elected = sign(sum(w * tau[p].item() for w, tau in zip(weights, trimmed, strict=True)))
        agreeing = [
            (w, tau[p].item())
            for w, tau in zip(weights, trimmed, strict=True)
            if sign(tau[p].item()) == elected and tau[p].item() != 0
        ]
        if agreeing:
            out[p] += sum(w * v for w, v in agreeing) / sum(w for w, _ in agreeing)
    return out.view_as(base)


def reference_dare(base, tuned, weights, density, masks):
    out = base.clone().reshape(-1)
    for tau_model, weight, mask in zip(tuned, weights, masks, strict=True):
        tau = (tau_model - base).reshape(-1)
        for p in range(out.numel()):
            if mask.reshape(-1)[p]:
                out[p] += weight * tau[p].item() / density
    return out.view_as(base)


def _models(dtype=torch.float64, shape=(12, 17), seed=0, levels=None):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    tuned = []
    for _ in range(2):
        delta = torch.randn(shape, generator=generator, dtype=torch.float64)
        if levels is not None:  # few distinct magnitudes: many ties at the trim threshold
            delta = torch.round(delta * levels) / levels
        tuned.append(base + delta)
    return base.to(dtype), [t.to(dtype) for t in tuned]


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.5)])
def test_ties_matches_the_paper(density, weights):
    base, tuned = _models()
    got = merge_units(MergeSpec(MergeMethod.TIES, density), base, tuned, weights, ["a", "b"])
    torch.testing.assert_close(got, reference_ties(base, tuned, weights, density), rtol=0, atol=1e-12)


def test_ties_with_many_equal_magnitudes_keeps_exactly_k_in_index_order():
    base, tuned = _models(levels=2)  # deltas in steps of 0.5: the threshold value is shared by many
    density = 0.3
    got = merge_units(MergeSpec(MergeMethod.TIES, density), base, tuned, (1.0, 1.0), ["a", "b"])
    torch.testing.assert_close(got, reference_ties(base, tuned, (1.0, 1.0), density), rtol=0, atol=1e-12)


def test_ties_sign_election_and_disjoint_mean_by_hand():
    base = torch.zeros(4, dtype=torch.float64)
    cpt = torch.tensor([3.0, -1.0, 2.0, 0.0], dtype=torch.float64)
    instruct = torch.tensor([1.0, 4.0, -2.0, 5.0], dtype=torch.float64)
    got = merge_units(MergeSpec(MergeMethod.TIES, 1.0), base, [cpt, instruct], (1.0, 1.0), ["a", "b"])
    # agree -> mean 2; elected + (sum 3) -> 4 alone; sum 0 -> no sign wins -> 0; only one -> itself
    torch.testing.assert_close(got, torch.tensor([2.0, 4.0, 0.0, 5.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [5, 64, 10_000])
def test_streamed_threshold_equals_whole_tensor_trim(dtype, block):
    base, tuned = _models(dtype=dtype, shape=(33, 29), levels=8)
    tau = (tuned[0] - base).reshape(-1)
    density = 0.37
    threshold = magnitude_threshold(lambda: tau.split(block), tau.numel(), density)
    trim = Trim(threshold)
    kept = torch.cat([trim.mask(part) for part in tau.split(block)])
    assert int(kept.sum()) == int(density * tau.numel())
    expected = reference_trim(tau.double(), density) != 0
    assert torch.equal(kept & (tau != 0), expected)


def test_threshold_edge_densities():
    tau = torch.randn(100, dtype=torch.float64)
    assert Trim(magnitude_threshold(lambda: [tau], 100, 1.0)).mask(tau).all()
    assert not Trim(magnitude_threshold(lambda: [tau], 100, 0.001)).mask(tau).any()


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.7)])
def test_dare_matches_the_paper(weights):
    base, tuned = _models(dtype=torch.float32)
    density = 0.3
    spec = MergeSpec(MergeMethod.DARE, density, seed=5)
    got = merge_units(spec, base, tuned, weights, ["cpt:w", "instruct:w"])
    masks = [dare_keep_mask(5, unit, 0, base.numel(), density) for unit in ("cpt:w", "instruct:w")]
    torch.testing.assert_close(
        got, reference_dare(base, tuned, weights, density, masks), rtol=1e-6, atol=1e-6
    )


def test_dare_mask_is_bernoulli_and_independent_of_blocks():
    density, count = 0.25, 3 * DARE_CHUNK + 123
    whole = dare_keep_mask(0, "unit", 11, count, density)
    assert abs(whole.double().mean().item() - density) < 0.01
    pieces = [
        dare_keep_mask(0, "unit", 11 + start, min(5000, count - start), density)
        for start in range(0, count, 5000)
    ]
    assert torch.equal(torch.cat(pieces), whole)
    other_unit = dare_keep_mask(0, "other", 11, count, density)
    other_seed = dare_keep_mask(1, "unit", 11, count, density)
    for other in (other_unit, other_seed):
        agreement = (other == whole).double().mean().item()
        assert abs(agreement - (density**2 + (1 - density) ** 2)) < 0.01  # independent draws


def test_task_arithmetic_is_the_weighted_sum():
    base, tuned = _models()
    got = merge_units(MergeSpec(), base, tuned, (1.0, 0.5), ["a", "b"])
    torch.testing.assert_close(got, base + (tuned[0] - base) + 0.5 * (tuned[1] - base))


def test_bad_options_are_refused():
    with pytest.raises(UsageError, match="needs --density"):
        MergeSpec(MergeMethod.TIES)
    with pytest.raises(UsageError, match=r"\(0, 1\]"):
        MergeSpec(MergeMethod.DARE, 1.5)
    with pytest.raises(UsageError, match="not task-arithmetic"):
        MergeSpec(MergeMethod.TASK_ARITHMETIC, 0.5)
    with pytest.raises(UsageError, match="unknown merge method"):
        MergeMethod.parse("slerp")
    base, tuned = _models()
    with pytest.raises(UsageError, match="positive weights"):
        merge_units(MergeSpec(MergeMethod.TIES, 0.5), base, tuned, (1.0, -1.0), ["a", "b"])
