"""GPU checks of the Triton kernels (skipped without CUDA): bf16 and fp32 against the float64
reference, the frozen/trainable pair, determinism, CUDA-graph capture of a decode step, inductor,
and a run past 2^31 elements of T·k·H."""

from __future__ import annotations

import pytest
import torch

from pdmoe.kernels import moe_mlp, moe_mlp_reference
from pdmoe.kernels.testing import random_moe_inputs

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("T", "H", "F", "E", "k"), [(300, 256, 192, 8, 2), (77, 200, 136, 6, 3), (1, 256, 128, 8, 2)]
)
def test_matches_reference(dtype, T, H, F, E, k):
    inputs = random_moe_inputs(T, H, F, E, k, dtype=dtype, device=CUDA, seed=T)
    dy = torch.randn(T, H, device=CUDA, dtype=dtype)
    got = fwd_bwd(moe_mlp, inputs, dy)
    want = fwd_bwd(
        moe_mlp_reference, [t.double() if t.is_floating_point() else t for t in inputs], dy.double()
    )
    for g, w in zip(got, want, strict=True):
        close(g, w, dtype)


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


def test_decode_step_in_cuda_graph():
    x, gate_up, down, w, ids = random_moe_inputs(4, 512, 384, 8, 2, dtype=torch.bfloat16, device=CUDA)
    static = [x.clone(), w.clone(), ids.clone()]
    moe_mlp(static[0], gate_up, down, static[1], static[2])  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_mlp(static[0], gate_up, down, static[1], static[2])
    for seed in range(3):
        new = random_moe_inputs(4, 512, 384, 8, 2, dtype=torch.bfloat16, device=CUDA, seed=100 + seed)
        for buf, src in zip(static, (new[0], new[3], new[4]), strict=True):
            buf.copy_(src)
        graph.replay()
        torch.testing.assert_close(out, moe_mlp(new[0], gate_up, down, new[3], new[4]), rtol=0, atol=0)


def test_inductor():
    inputs = random_moe_inputs(64, 256, 128, 4, 2, dtype=torch.bfloat16, device=CUDA)
    dy = torch.randn(64, 256, device=CUDA, dtype=torch.bfloat16)
    compiled = torch.compile(moe_mlp, fullgraph=True)
    for g, w in zip(fwd_bwd(compiled, inputs, dy), fwd_bwd(moe_mlp, inputs, dy), strict=True):
        torch.testing.assert_close(g, w)


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
