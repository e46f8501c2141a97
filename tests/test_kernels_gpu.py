"""GPU checks of the Triton kernels (skipped without CUDA): bf16 and fp32 against the float64
reference (outputs and all four gradients), the TMA and pointer operand paths, dropped ids, the
frozen/trainable pair, ``torch._grouped_mm`` dispatch with an expert that gets no rows, determinism,
CUDA-graph capture of a split-K decode step, inductor, and a run past 2^31 elements of T·k·H."""

from __future__ import annotations

import pytest
import torch

import pdmoe.kernels.grouped_gemm as gg
import pdmoe.kernels.moe_op as moe_op
from pdmoe.kernels import dispatch, moe_mlp, moe_mlp_reference
from pdmoe.kernels.testing import random_moe_inputs, random_routing, tiny_transformers_moes
from pdmoe.kernels.tuning import Gemm

pytestmark = pytest.mark.gpu
CUDA = "cuda"
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def fwd_bwd(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs[:4]]
    y = fn(*leaves, inputs[4])
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def check(inputs, dtype, dy=None):
    dy = torch.randn(inputs[0].shape, device=CUDA, dtype=dtype) if dy is None else dy
    got = fwd_bwd(moe_mlp, inputs, dy)
    want = fwd_bwd(
        moe_mlp_reference, [t.double() if t.is_floating_point() else t for t in inputs], dy.double()
    )
    for g, w in zip(got, want, strict=True):
        close(g, w, dtype)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("T", "H", "F", "E", "k"),
    [(300, 256, 192, 8, 2), (77, 200, 136, 6, 3), (1, 256, 128, 8, 2), (2100, 512, 384, 4, 2)],
)
def test_matches_reference(dtype, T, H, F, E, k):
    check(random_moe_inputs(T, H, F, E, k, dtype=dtype, device=CUDA, seed=T), dtype)


@pytest.mark.parametrize("tma", [True, False])
def test_own_kernels_at_training_size(monkeypatch, tma):
    """Every GEMM on pdmoe's kernels (no grouped_mm dispatch) in the large-T tables, with the TMA and
    the pointer operand paths."""
    monkeypatch.setitem(dispatch.GROUPED_MM_RULES, Gemm.WEIGHT_GRAD, None)
    monkeypatch.setitem(dispatch.GROUPED_MM_RULES, Gemm.INPUT_GRAD, None)
    if not tma:
        monkeypatch.setattr(gg, "_tma_ok", lambda t: False)
    check(random_moe_inputs(1500, 256, 192, 8, 2, dtype=torch.bfloat16, device=CUDA, seed=3), torch.bfloat16)


def test_dropped_ids():
    x, gate_up, down, w, ids = random_moe_inputs(700, 256, 192, 8, 2, dtype=torch.bfloat16, device=CUDA)
    bad = torch.zeros_like(ids, dtype=torch.bool)
    bad[::3, 0] = True
    y = moe_mlp(x, gate_up, down, w, ids.masked_fill(bad, 8))
    want = moe_mlp_reference(x.double(), gate_up.double(), down.double(), w.masked_fill(bad, 0).double(), ids)
    close(y, want, torch.bfloat16)


def test_grouped_mm_with_an_empty_expert():
    """All weights trainable at enough rows per expert: the rule sends weight gradients and d(hidden) to
    torch._grouped_mm on Hopper; the expert without rows must get an exact zero gradient."""
    ids = random_routing(4096, 3, 2, generator=torch.Generator().manual_seed(5))  # expert 3 gets nothing
    inputs = random_moe_inputs(4096, 512, 256, 4, 2, dtype=torch.bfloat16, device=CUDA, topk_ids=ids)
    rows = ids.numel()
    used = dispatch.use_grouped_mm(Gemm.WEIGHT_GRAD, (inputs[0], inputs[0]), rows, 4)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert used
    _, _, g_gate_up, g_down, _ = check(inputs, torch.bfloat16)
    assert (g_gate_up[3] == 0).all() and (g_down[3] == 0).all()


def test_frozen_pair_and_determinism():
    x, gate_up, down, w, ids = random_moe_inputs(512, 256, 192, 4, 2, dtype=torch.bfloat16, device=CUDA)
    train_gu = gate_up[1:].clone().requires_grad_(True)
    train_d = down[1:].clone().requires_grad_(True)
    grads = []
    for _ in range(2):
        train_gu.grad = train_d.grad = None
        moe_mlp(x, (gate_up[:1], train_gu), (down[:1], train_d), w, ids).float().square().sum().backward()
        grads.append((train_gu.grad.clone(), train_d.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    gu_full = gate_up.double().requires_grad_(True)
    d_full = down.double().requires_grad_(True)
    moe_mlp_reference(x.double(), gu_full, d_full, w.double(), ids).square().sum().backward()
    close(grads[0][0], gu_full.grad[1:], torch.bfloat16)
    close(grads[0][1], d_full.grad[1:], torch.bfloat16)


def test_decode_step_in_cuda_graph(monkeypatch):
    """A decode step (F long enough for the down projection to be split over K) replayed from a graph."""
    splits = []
    split_k = moe_op.split_k
    monkeypatch.setattr(moe_op, "split_k", lambda *args: splits.append(split_k(*args)) or splits[-1])
    shape = (4, 512, 2048, 8, 2)
    x, gate_up, down, w, ids = random_moe_inputs(*shape, dtype=torch.bfloat16, device=CUDA)
    static = [x.clone(), w.clone(), ids.clone()]
    moe_mlp(static[0], gate_up, down, static[1], static[2])  # compile the kernels outside the capture
    assert splits[-1] > 1
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_mlp(static[0], gate_up, down, static[1], static[2])
    for seed in range(3):
        new = random_moe_inputs(*shape, dtype=torch.bfloat16, device=CUDA, seed=100 + seed)
        for buf, src in zip(static, (new[0], new[3], new[4]), strict=True):
            buf.copy_(src)
        graph.replay()
        torch.testing.assert_close(out, moe_mlp(new[0], gate_up, down, new[3], new[4]), rtol=0, atol=0)
        want = moe_mlp_reference(new[0].double(), gate_up.double(), down.double(), new[3].double(), new[4])
        close(out, want, torch.bfloat16)


def test_inductor():
    inputs = random_moe_inputs(64, 256, 128, 4, 2, dtype=torch.bfloat16, device=CUDA)
    dy = torch.randn(64, 256, device=CUDA, dtype=torch.bfloat16)
    compiled = torch.compile(moe_mlp, fullgraph=True)
    for g, w in zip(fwd_bwd(compiled, inputs, dy), fwd_bwd(moe_mlp, inputs, dy), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", sorted(tiny_transformers_moes()))
def test_transformers_pdmoe_experts_on_cuda(name, tmp_path):
    """experts_implementation="pdmoe" on a transformers model: the eager experts' logits and gradients."""
    cls, config = tiny_transformers_moes()[name]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    models = [
        cls.from_pretrained(tmp_path, experts_implementation=impl, dtype=torch.float32).to(CUDA)
        for impl in ("eager", "pdmoe")
    ]
    ids = torch.randint(
        0, config.vocab_size, (2, 7), device=CUDA, generator=torch.Generator(CUDA).manual_seed(1)
    )
    outputs = [model(ids, labels=ids) for model in models]
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=1e-4, atol=1e-4)
    for out in outputs:
        out.loss.backward()
    for param in ("gate_up_proj", "down_proj"):
        want, got = (getattr(m.model.layers[0].mlp.experts, param).grad for m in models)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_moe_model_on_the_triton_path(tmp_path):
    """An upcycled pdmoe model with distinct experts and frozen originals: experts_impl="triton" against
    "torch" (the reference) on CUDA, logits and the gradients of every trainable parameter."""
    from transformers import AutoModelForCausalLM

    from pdmoe.tiny import build_tiny_dense
    from pdmoe.upcycle import upcycle

    moe = upcycle(build_tiny_dense(tmp_path / "dense", "llama"), tmp_path / "moe", num_experts=4, top_k=2)
    models = []
    for impl in ("torch", "triton"):
        model = AutoModelForCausalLM.from_pretrained(moe, experts_impl=impl, dtype=torch.float32).to(CUDA)
        torch.manual_seed(3)
        with torch.no_grad():  # the same perturbation in both: experts that differ from each other
            for name, param in model.named_parameters():
                if ".experts." in name:
                    param[1:].add_(torch.randn_like(param[1:]) * 0.05)
        model.freeze_original_experts()
        models.append(model)
    ids = torch.randint(
        0, models[0].config.vocab_size, (2, 9), device=CUDA, generator=torch.Generator(CUDA).manual_seed(2)
    )
    outputs = [model(ids, labels=ids) for model in models]
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=1e-4, atol=1e-4)
    for out in outputs:
        out.loss.backward()
    trainable = [dict((n, p.grad) for n, p in m.named_parameters() if p.requires_grad) for m in models]
    assert trainable[0].keys() == trainable[1].keys() and trainable[0]
    for name, want in trainable[0].items():
        torch.testing.assert_close(trainable[1][name], want, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_beyond_int32_offsets():
    """T·k·H = 2·1024·(2^20 + 5) > 2^31: rows at the far end must land where the reference puts them."""
    T, H, F, E, k = 2**20 + 5, 1024, 64, 4, 2
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~12 GiB free plus headroom")
    _, gate_up, down, _, _ = random_moe_inputs(1, H, F, E, k, dtype=torch.bfloat16, device=CUDA)
    g = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(T, H, device=CUDA, dtype=torch.bfloat16, generator=g)  # 2 GiB, made on the device
    ids = torch.rand(T, E, device=CUDA, generator=g).argsort(dim=1)[:, :k]
    w = torch.rand(T, k, device=CUDA, generator=g).softmax(dim=1).to(torch.bfloat16)
    with torch.no_grad():
        y = moe_mlp(x, gate_up, down, w, ids)
        rows = torch.tensor([0, 1, T // 2, T - 2, T - 1], device=CUDA)
        want = moe_mlp_reference(
            x[rows].double(), gate_up.double(), down.double(), w[rows].double(), ids[rows]
        )
    close(y[rows], want, torch.bfloat16)
