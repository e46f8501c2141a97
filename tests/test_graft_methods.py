"""The merge methods against references written from the papers, element by element.

TIES (Yadav et al. 2023, Algorithm 1): trim each task vector to its top-k% magnitudes, elect
γ = sgn(Σ_t τ̂_t), take the mean over the task vectors whose sign equals γ ("disjoint mean").
DARE (Yu et al. 2023): drop each delta entry with probability p, rescale the rest by 1/(1 − p),
then add the task vectors. Weights w_t generalise both as in mergekit (weighted sign election and
weighted mean for TIES, Σ w_t for DARE); with w = 1 they are the papers' formulas.
"""

from __future__ import annotations

import json

import pytest
import torch

from pdmoe.cli import main
from pdmoe.errors import Option, Problem, UsageError
from pdmoe.graft import GraftOptions, graft
from pdmoe.graft.merging import (
    DARE_CHUNK,
    Trim,
    dare_keep_mask,
    magnitude_threshold,
    merge_units,
    task_arithmetic,
)
from pdmoe.graft.methods import MergeMethod, MergeSpec, TaskVectorMerge, strategy
from pdmoe.graft.methods.registry import _STRATEGIES, check_registry
from tests.graft_checkpoints import load_dir, make


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
                out[p] += weight * (tau[p].item() / density)
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
    refusals = {
        (Problem.MISSING, (Option("method", "ties"), Option("density"))): lambda: MergeSpec(MergeMethod.TIES),
        (Problem.INVALID, (Option("density"),)): lambda: MergeSpec(MergeMethod.DARE, 1.5),
        (Problem.CONFLICT, (Option("density"), Option("method", "task-arithmetic"))): lambda: MergeSpec(
            MergeMethod.TASK_ARITHMETIC, 0.5
        ),
    }
    for (problem, options), refused in refusals.items():
        with pytest.raises(UsageError) as caught:
            refused()
        assert (caught.value.problem, caught.value.options) == (problem, options)
    with pytest.raises(UsageError, match="unknown merge method"):
        MergeMethod.parse("slerp")
    base, tuned = _models()
    with pytest.raises(UsageError, match="positive weights"):
        merge_units(MergeSpec(MergeMethod.TIES, 0.5), base, tuned, (1.0, -1.0), ["a", "b"])


def test_every_method_has_its_strategy():
    assert [strategy(method).method for method in MergeMethod] == list(MergeMethod)
    check_registry()


def test_a_method_without_a_strategy_fails_loudly(monkeypatch):
    """No method silently runs as another: without its strategy a method cannot even be specified."""
    monkeypatch.delitem(_STRATEGIES, MergeMethod.DARE)
    with pytest.raises(LookupError, match="dare has no registered strategy"):
        MergeSpec(MergeMethod.DARE, 0.5)
    with pytest.raises(LookupError, match="without a registered strategy: dare"):
        check_registry()


class _PlainSum(TaskVectorMerge):
    """A strategy written against the hooks alone: Σ_t w_t τ_t, untrimmed."""

    method = MergeMethod.DARE
    summary = "test: the task vectors' weighted sum"

    def check_options(self, spec):
        pass

    def describe(self, spec):
        return "method plain-sum"

    def merge_deltas(self, spec, deltas, weights, units):
        return task_arithmetic(deltas, weights)

    def instruct_vector(self, tensor, piece, piece_index, first, instruct):
        return instruct

    def merge_block(self, tensor, expert, piece, piece_index, first, cpt, instruct):
        return task_arithmetic([cpt, instruct], tensor.weights)


def test_a_registered_strategy_is_all_a_method_needs(tmp_path, monkeypatch):
    """Swapped into the registry, a strategy's hooks alone drive the streamed graft: the weighted
    sum of the task vectors, merged on BASE, is the task-arithmetic graft CPT + SCALE * delta."""
    monkeypatch.setitem(_STRATEGIES, MergeMethod.DARE, _PlainSum())
    base, instruct, cpt = make(tmp_path, moe=True)
    report = graft(base, instruct, cpt, tmp_path / "sum", GraftOptions(method="dare", scale=0.5))
    graft(base, instruct, cpt, tmp_path / "graft", GraftOptions(scale=0.5))
    got, expected = load_dir(tmp_path / "sum"), load_dir(tmp_path / "graft")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    assert report.plan.merge.describe() == "method plain-sum"


# --- the streamed graft (`pdmoe graft --method ties|dare`) against the reference, tensor by tensor ---


def reference_merged_graft(
    base_dir, instruct_dir, cpt_dir, method, density, seed=0, scale=1.0, work=torch.float64
):
    """Every output tensor from whole state dicts: each unit merged by the reference formulas above.

    Units: a dense tensor's rows that BASE has; in an MoE layer, each expert's gate rows, up rows and
    down, whose CPT task vector is W_e - W_FFN,BASE and whose INSTRUCT task vector is the dense FFN's.
    DARE's masks are the one input taken from the implementation (they are random draws). ``work``
    is the dtype task vectors are formed in (float32 for 16-bit inputs, as the graft does).
    """
    base, instruct, cpt = load_dir(base_dir), load_dir(instruct_dir), load_dir(cpt_dir)

    def merged(dense: str, tuned: torch.Tensor, cpt_unit: str) -> torch.Tensor:
        b = base[dense].to(work)
        c, i = tuned.to(work), instruct[dense][: b.shape[0]].to(work)
        if method == "ties":
            return reference_ties(b, [c, i], (1.0, scale), density)
        masks = [
            dare_keep_mask(seed, unit, 0, b.numel(), density).view(b.shape)
            for unit in (cpt_unit, f"instruct:{dense}")
        ]
        return reference_dare(b, [c, i], (1.0, scale), density, masks)

    out = {}
    for name, value in cpt.items():
        result = value.double().clone()
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            mlp = name.rsplit(".experts.", 1)[0]
            half = base[f"{mlp}.gate_proj.weight"].shape[0]
            pieces = (
                [(f"{mlp}.gate_proj.weight", 0, half), (f"{mlp}.up_proj.weight", half, 2 * half)]
                if name.endswith("gate_up_proj")
                else [(f"{mlp}.down_proj.weight", 0, value.shape[1])]
            )
            for expert in range(value.shape[0]):
                for dense, lo, hi in pieces:
                    result[expert, lo:hi] = merged(dense, value[expert, lo:hi], f"cpt:{name}:{expert}:{lo}")
        elif name in base and not name.endswith("mlp.gate.weight"):
            rows = base[name].shape[0]
            result[:rows] = merged(name, value[:rows], f"cpt:{name}:0:0")
        out[name] = result.to(value.dtype)
    return out


@pytest.mark.parametrize("method", ["ties", "dare"])
@pytest.mark.parametrize(
    "scenario",
    [
        {"moe": True},
        {"moe": True, "dtype": torch.bfloat16},
        {"cpt_vocab": 23},  # dense CPT that added tokens: their rows keep CPT's values
    ],
    ids=["moe-fp32", "moe-bf16", "dense-new-rows"],
)
def test_streamed_graft_equals_the_reference(tmp_path, monkeypatch, method, scenario):
    import pdmoe.graft.merge_stream
    import pdmoe.graft.runner

    # Tiny blocks: every unit is streamed in several blocks, each merged in several pieces, so
    # thresholds, tie budgets and masks cross blocks.
    monkeypatch.setattr(pdmoe.graft.runner, "BLOCK_ELEMENTS", 24)
    monkeypatch.setattr(pdmoe.graft.merge_stream, "MERGE_ELEMENTS", 10)
    base, instruct, cpt = make(tmp_path, **scenario)
    # scale exact in binary: a sign election on an exact cancellation (bf16's coarse grid makes some)
    # must not depend on how the product scale * delta is rounded
    density, scale = (0.3, 0.75) if method == "ties" else (0.4, 0.8)
    report = graft(
        base,
        instruct,
        cpt,
        tmp_path / "out",
        GraftOptions(method=method, density=density, seed=3, scale=scale),
    )
    work = torch.float64 if scenario.get("dtype", torch.float32) == torch.float32 else torch.float32
    expected = reference_merged_graft(base, instruct, cpt, method, density, seed=3, scale=scale, work=work)
    got = load_dir(tmp_path / "out")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        # float32 inputs merge in float64 (one rounding at the end): bit-equal to the reference;
        # bf16 inputs merge in float32: equal up to the reference's different rounding order
        if tensor.dtype == torch.float32:
            assert torch.equal(got[name], tensor), name
        else:
            torch.testing.assert_close(got[name].float(), tensor.float(), rtol=8e-3, atol=1e-6, msg=name)
    manifest = json.loads((tmp_path / "out" / "graft.json").read_text())
    assert manifest["merge"].startswith(f"method {method}, density")
    assert report.plan.merge.method.value == method


def test_graft_command_line_merge_options(tmp_path, capsys):
    base, instruct, cpt = make(tmp_path, moe=True)
    common = ["graft", "--base", str(base), "--instruct", str(instruct), "--cpt", str(cpt)]
    assert (
        main([*common, "--out", str(tmp_path / "a"), "--method", "dare", "--density", "0.5", "--seed", "4"])
        == 0
    )
    graft(base, instruct, cpt, tmp_path / "b", GraftOptions(method="dare", density=0.5, seed=4))
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert all(torch.equal(a[name], b[name]) for name in a)
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "c"), "--method", "ties"]) == 2
    assert capsys.readouterr().err == (
        "pdmoe graft: error: --method ties needs --density, the fraction of each task vector kept (e.g. 0.2)\n"
    )
    for options, message in (
        (["--method", "dare", "--density", "1.5"], "--density must be in (0, 1], got 1.5"),
        (["--density", "0.5"], "--density does not apply to --method task-arithmetic: it keeps all of each task vector"),
        (["--method", "ties", "--density", "0.5", "--scale", "-1"], "--method ties needs positive weights (--scale > 0), got [1.0, -1.0]"),
    ):  # fmt: skip
        assert main([*common, "--out", str(tmp_path / "c"), *options]) == 2
        assert capsys.readouterr().err == f"pdmoe graft: error: {message}\n"
    assert not (tmp_path / "c").exists()
