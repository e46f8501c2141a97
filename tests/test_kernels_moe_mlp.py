"""Triton ``moe_mlp`` (CPU interpreter, fp32) against the float64 reference: output and all four
gradients over random routings and the edge cases (one expert for all tokens, unused experts, a repeated
expert, out-of-range ids, no tokens), the (frozen, trainable) form, strided inputs, both operand paths
(TMA descriptors and pointers), split-K and ``torch._grouped_mm`` dispatch, determinism, int64 offsets
and the torch.compile/custom-op plumbing. The interpreter runs every persistent grid with two programs,
so each program loops over several tiles."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import pdmoe.kernels.grouped_gemm as gg
import pdmoe.kernels.moe_op as mm
from pdmoe.kernels import dispatch, moe_mlp, moe_mlp_reference, tuning
from pdmoe.kernels.testing import random_moe_inputs
from pdmoe.kernels.tiles import _offset


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 kernel vs float64 reference: relative to the tensor's scale."""
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)


def run(fn, x, gate_up, down, w, ids, dy, grads=(True, True, True, True)):
    """y and the gradients of (x, gate_up, down, w) that ``grads`` asks for (None otherwise)."""
    leaves = [t.detach().clone().requires_grad_(g) for t, g in zip((x, gate_up, down, w), grads, strict=True)]
    y = fn(*leaves, ids)
    if any(grads):
        y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


def check(x, gate_up, down, w, ids, grads=(True, True, True, True)):
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    y, g = run(moe_mlp, x, gate_up, down, w, ids, dy, grads)
    f64 = [t.double() for t in (x, gate_up, down, w)]
    y_ref, g_ref = run(moe_mlp_reference, *f64, ids, dy.double(), grads)
    close(y, y_ref)
    for name, got, want in zip(("hidden", "gate_up", "down", "weights"), g, g_ref, strict=True):
        assert (got is None) == (want is None), name
        if want is not None:
            close(got, want)
    return y, g


# (T, H, F, E, k): H and F are no multiples of the interpreter's 16/32 blocks; T = 1 is the decode edge.
@pytest.mark.parametrize(
    ("T", "H", "F", "E", "k", "seed"),
    [(13, 40, 24, 4, 2, 0), (37, 24, 40, 8, 3, 1), (1, 40, 24, 4, 2, 2), (9, 17, 9, 3, 1, 3)],
)
def test_random_routing(T, H, F, E, k, seed):
    check(*random_moe_inputs(T, H, F, E, k, seed=seed))


def test_all_tokens_on_one_expert():
    # 40 rows on expert 2: several row tiles for one expert, every other expert empty.
    ids = torch.full((40, 1), 2)
    check(*random_moe_inputs(40, 24, 20, 4, 1, seed=4, topk_ids=ids))


def test_experts_without_tokens_and_int32_ids():
    ids = torch.tensor([[1, 5], [5, 1], [1, 6]] * 5, dtype=torch.int32)
    check(*random_moe_inputs(15, 24, 20, 8, 2, seed=5, topk_ids=ids))


def test_repeated_expert_within_a_token():
    # Not what top-k produces, but allowed: both slots of token 0 go to expert 1.
    ids = torch.tensor([[1, 1], [2, 1], [0, 3]] * 4)
    check(*random_moe_inputs(12, 24, 20, 4, 2, seed=17, topk_ids=ids))


def test_gradients_only_where_asked():
    # Frozen weights and hidden: only d(topk_weights), which goes through the SwiGLU-backward kernel.
    check(*random_moe_inputs(11, 24, 20, 4, 2, seed=6), grads=(False, False, False, True))
    check(*random_moe_inputs(11, 24, 20, 4, 2, seed=6), grads=(False, False, True, False))


def test_nan_propagates():
    x, gate_up, down, w, ids = random_moe_inputs(10, 24, 20, 4, 2, seed=8)
    x[3, 5] = float("nan")
    y = moe_mlp(x, gate_up, down, w, ids)
    assert torch.isnan(y[3]).all()
    assert not torch.isnan(y[torch.arange(10) != 3]).any()


def test_deterministic():
    inputs = random_moe_inputs(21, 24, 20, 4, 2, seed=9)
    dy = torch.randn(21, 24)
    y1, g1 = run(moe_mlp, *inputs, dy)
    y2, g2 = run(moe_mlp, *inputs, dy)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_strided_inputs():
    x, gate_up, down, w, ids = random_moe_inputs(12, 24, 20, 4, 2, seed=10)
    x = torch.cat([x, torch.randn(12, 5)], dim=1)[:, :24]  # row stride 29
    gate_up = gate_up.transpose(1, 2).contiguous().transpose(1, 2)  # H is the slow axis
    w = torch.stack([w, torch.rand_like(w)], dim=2)[..., 0]  # column stride 2
    assert not (x.is_contiguous() or gate_up.is_contiguous() or w.is_contiguous())
    check(x, gate_up, down, w, ids)


def test_frozen_trainable_pair(monkeypatch):
    """Frozen expert 0 + trainable experts 1..3: same result, grads only (and only sized) for the trainable part."""
    x, gate_up, down, w, ids = random_moe_inputs(14, 24, 20, 4, 2, seed=11)
    launched = []
    weight_grad = mm.gg.weight_grad

    def spy(a, b, expert_base, n_local, *args, **kwargs):
        launched.append((expert_base, n_local))
        return weight_grad(a, b, expert_base, n_local, *args, **kwargs)

    monkeypatch.setattr(mm.gg, "weight_grad", spy)
    frozen_gu, frozen_d = gate_up[:1].clone(), down[:1].clone()
    train_gu, train_d = gate_up[1:].clone().requires_grad_(True), down[1:].clone().requires_grad_(True)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = moe_mlp(xg, (frozen_gu, train_gu), (frozen_d, train_d), wg, ids)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert frozen_gu.grad is None and frozen_d.grad is None
    assert launched == [(1, 3), (1, 3)]  # one launch per weight, experts 1..3 only
    y_ref, (gx, ggu, gd, gw) = run(
        moe_mlp_reference, *(t.double() for t in (x, gate_up, down, w)), ids, dy.double()
    )
    close(y.detach(), y_ref)
    close(xg.grad, gx)
    close(wg.grad, gw)
    assert train_gu.grad.shape == train_gu.shape and train_d.grad.shape == train_d.shape
    close(train_gu.grad, ggu[1:])
    close(train_d.grad, gd[1:])


def test_inference_saves_nothing(monkeypatch):
    x, gate_up, down, w, ids = random_moe_inputs(6, 24, 20, 4, 2, seed=12)
    saved = []
    gate_up_fwd = mm.gg.gate_up_fwd

    def spy(*args, **kwargs):
        h, preact = gate_up_fwd(*args, **kwargs)
        saved.append(preact.numel())
        return h, preact

    monkeypatch.setattr(mm.gg, "gate_up_fwd", spy)
    with torch.no_grad():
        y = moe_mlp(x, gate_up.requires_grad_(True), down, w, ids)
    moe_mlp(x, gate_up, down, w, ids)
    assert saved == [0, 12 * 2 * 20]  # [gate | up] of T·k rows only when a backward can follow
    close(y, moe_mlp_reference(*(t.double() for t in (x, gate_up.detach(), down, w)), ids))


@triton.jit
def _offset_probe(
    rows_ptr,  # [n] int32 row indices
    out_ptr,  # [n] int64 out: _offset(row, stride)
    stride,
    n,
    BLOCK: tl.constexpr,
):
    i = tl.arange(0, BLOCK)
    rows = tl.load(rows_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, _offset(index=rows, stride=stride), mask=i < n)


def test_offsets_are_64_bit():
    """Every kernel addresses rows through ``_offset``; past 2^31 elements it must not wrap.

    T·k·H > 2^31 cannot be allocated here, so check the helper the kernels use on int32 row indices
    (like the routing tensors) times a row stride, as the kernels do."""
    rows = torch.tensor([0, 1, 2**20 + 3, 2**31 - 1, 3 * 2**20], dtype=torch.int32)
    stride = 14336  # T·k rows of down-projection width: row 2^20 already starts past 2^33
    out = torch.empty(5, dtype=torch.int64)
    _offset_probe[(1,)](rows_ptr=rows, out_ptr=out, stride=stride, n=5, BLOCK=8)
    assert out.tolist() == [r * stride for r in rows.tolist()]
    assert max(out.tolist()) > 2**31


def test_fake_tensor_and_compile():
    """The custom op traces with fake tensors and runs under torch.compile (aot_eager on CPU)."""
    inputs = random_moe_inputs(8, 24, 20, 4, 2, seed=13)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in inputs]
        assert moe_mlp(*fake).shape == (8, 24)

    def step(x, gu, d, w, ids):
        return moe_mlp(x, gu, d, w, ids).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in inputs[:4]]
    compiled(*leaves, inputs[4]).backward()
    eager = [t.clone().requires_grad_(True) for t in inputs[:4]]
    step(*eager, inputs[4]).backward()
    for a, b in zip(leaves, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_opcheck():
    """Schema, autograd registration, fake-tensor impl and AOT dispatch of the forward custom op."""
    x, gate_up, down, w, ids = random_moe_inputs(5, 16, 16, 3, 2, seed=14)
    args = (
        x.requires_grad_(True),
        gate_up.requires_grad_(True),
        None,
        down,
        None,
        w.requires_grad_(True),
        ids,
        True,
    )
    torch.library.opcheck(torch.ops.pdmoe.moe_mlp_fwd, args)


def test_no_tokens():
    x, gate_up, down, w, ids = random_moe_inputs(0, 24, 20, 4, 2)
    x.requires_grad_(True)
    y = moe_mlp(x, gate_up, down, w, ids)
    y.sum().backward()
    assert y.shape == (0, 24) and x.grad.shape == (0, 24)


def test_autocast_casts_like_linear():
    """fp32 master weights under (CPU, fp16) autocast: computed in fp16, gradients reach the fp32 weights."""
    x, gate_up, down, w, ids = random_moe_inputs(9, 24, 20, 4, 2, seed=15)
    gate_up.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        y = moe_mlp(x, gate_up, down, w, ids)
    y.float().sum().backward()
    assert y.dtype == torch.float16 and gate_up.grad.dtype == torch.float32
    gate_up64 = gate_up.detach().double().requires_grad_(True)
    want = moe_mlp_reference(x.double(), gate_up64, down.double(), w.double(), ids)
    want.sum().backward()
    torch.testing.assert_close(y.double(), want.detach(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gate_up.grad.double(), gate_up64.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("T", "bucket_tokens"), [(5, None), (40, None), (45, 16384)])
def test_shipped_hopper_tiles(monkeypatch, T, bucket_tokens):
    """The H100 table's tile shapes (decode: one row tile of next_pow2(T) per expert; training:
    128-row tiles spanning several experts' rows), run in the interpreter."""
    from pdmoe.kernels.tuning import config_for

    def hopper(gemm, n_tokens, device, dtype):
        return config_for("NVIDIA H100 80GB HBM3", gemm, bucket_tokens or n_tokens, dtype)

    monkeypatch.setattr(mm, "get_config", hopper)
    check(*random_moe_inputs(T, 40, 24, 4, 2, seed=16 + T))


def test_out_of_range_ids_are_dropped():
    """A slot whose id is outside [0, E) adds nothing and gets a zero d(weight): the same output and
    gradients as the reference with that slot's weight set to 0 (and any valid id)."""
    x, gate_up, down, w, ids = random_moe_inputs(19, 24, 20, 4, 2, seed=18)
    bad = torch.zeros_like(ids, dtype=torch.bool)
    bad[::4, 0] = bad[1::5, 1] = True
    invalid = ids.masked_fill(bad, 4)
    invalid[2, 0], bad[2, 0] = -1, True
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    y, grads = run(moe_mlp, x, gate_up, down, w, invalid, dy)
    w_dropped = w.masked_fill(bad, 0.0)
    y_ref, grads_ref = run(
        moe_mlp_reference, *(t.double() for t in (x, gate_up, down, w_dropped)), ids, dy.double()
    )
    close(y, y_ref)
    for got, want in zip(grads[:3], grads_ref[:3], strict=True):
        close(got, want)
    assert (grads[3][bad] == 0).all()
    close(grads[3][~bad], grads_ref[3][~bad])


def test_pointer_operands(monkeypatch):
    """Contiguous inputs normally go through TMA descriptors; the pointer path computes the same."""
    monkeypatch.setattr(gg, "_tma_ok", lambda t: False)
    check(*random_moe_inputs(23, 40, 24, 4, 2, seed=19))


def test_split_k(monkeypatch):
    """Split over K (the decode down projection, F = 70: slices of 32, 32, 6) and over rows (weight
    gradients): fp32 partial sums added in a fixed order give the unsplit result."""
    monkeypatch.setattr(mm, "split_k", lambda tiles, k_steps, min_steps, cfg, device: 3)
    monkeypatch.setattr(mm, "bucket", lambda n_tokens: "decode")
    check(*random_moe_inputs(40, 24, 70, 2, 2, seed=20))  # 40 rows per expert: row slices 32, 8, 0


def test_torch_grouped_mm_dispatch(monkeypatch):
    """Weight gradients and d(hidden) through ``torch._grouped_mm`` (CPU here) where the rule picks it."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    picked = []

    def always(gemm, operands, rows, n_experts):
        picked.append(gemm)
        return True

    monkeypatch.setattr(mm, "use_grouped_mm", always)
    check(*random_moe_inputs(29, 24, 20, 4, 2, seed=21))
    assert set(picked) == set(dispatch.GROUPED_MM_RULES)  # every rule is consulted


def test_grouped_mm_rule_needs_cuda_bf16_and_enough_rows():
    a = torch.randn(4096, 64, dtype=torch.bfloat16)
    assert not dispatch.use_grouped_mm(tuning.Gemm.WEIGHT_GRAD, (a, a), 4096, 8)  # on the CPU


def test_interpreter_grid_loops_over_tiles():
    """The interpreter's persistent grid has fewer programs than tiles, so the tile loop is exercised."""
    cfg = tuning.get_config(tuning.Gemm.GATE_UP_FWD, 40, torch.device("cpu"), torch.float32)
    assert tuning.programs(cfg, torch.device("cpu")) == 2
