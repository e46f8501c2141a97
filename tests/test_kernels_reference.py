"""The plain-PyTorch reference against a naive float64 per-token loop, incl. the (frozen, trainable) form."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pdmoe.kernels import moe_mlp_reference
from pdmoe.kernels.testing import random_moe_inputs


def naive(x, gate_up, down, w, ids):
    """docs/method.md's formula, one token and one slot at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            out[t] += w[t, j] * (down[e] @ (F.silu(gate) * up))
    return out


def make(T, H, Fd, E, k, seed=0):
    return random_moe_inputs(T, H, Fd, E, k, dtype=torch.float64, seed=seed)


@pytest.mark.parametrize(("T", "H", "Fd", "E", "k"), [(1, 4, 3, 2, 1), (9, 8, 6, 4, 2), (13, 5, 7, 8, 3)])
def test_reference_matches_naive_loop(T, H, Fd, E, k):
    x, gate_up, down, w, ids = make(T, H, Fd, E, k)
    torch.testing.assert_close(moe_mlp_reference(x, gate_up, down, w, ids), naive(x, gate_up, down, w, ids))


def test_reference_int32_ids_and_unused_experts():
    x, gate_up, down, w, _ = make(6, 8, 4, 5, 2)
    ids = torch.tensor([[0, 3], [3, 0], [0, 3], [3, 0], [0, 3], [3, 0]], dtype=torch.int32)
    torch.testing.assert_close(
        moe_mlp_reference(x, gate_up, down, w, ids), naive(x, gate_up, down, w, ids.long())
    )


def test_reference_rejects_out_of_range_ids():
    x, gate_up, down, w, ids = make(3, 4, 3, 2, 1)
    with pytest.raises(ValueError, match="expert id"):
        moe_mlp_reference(x, gate_up, down, w, ids + 2)


def test_reference_tuple_form_grads_only_for_trainable():
    x, gate_up, down, w, ids = make(11, 8, 6, 4, 2, seed=1)
    x.requires_grad_(True)
    w.requires_grad_(True)
    frozen_gu, frozen_d = gate_up[:1].clone(), down[:1].clone()
    train_gu = gate_up[1:].clone().requires_grad_(True)
    train_d = down[1:].clone().requires_grad_(True)
    y = moe_mlp_reference(x, (frozen_gu, train_gu), (frozen_d, train_d), w, ids)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert frozen_gu.grad is None and frozen_d.grad is None

    full_gu = gate_up.clone().requires_grad_(True)
    full_d = down.clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(True)
    naive(x2, full_gu, full_d, w2, ids).backward(dy)
    torch.testing.assert_close(y, naive(x, gate_up, down, w, ids).detach())
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(train_gu.grad, full_gu.grad[1:])
    torch.testing.assert_close(train_d.grad, full_d.grad[1:])


def test_reference_propagates_nan():
    x, gate_up, down, w, ids = make(4, 8, 6, 4, 2, seed=2)
    x[2, 3] = float("nan")
    y = moe_mlp_reference(x, gate_up, down, w, ids)
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3]]).any()


def test_import_without_triton(tmp_path):
    """``import pdmoe`` works where Triton is missing; the reference runs, only moe_mlp refuses."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import pdmoe\n"
        "from pdmoe.kernels import moe_mlp, moe_mlp_reference\n"
        "from pdmoe.kernels.testing import random_moe_inputs\n"
        "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
        "args = random_moe_inputs(3, 8, 4, 2, 1)\n"
        "assert moe_mlp_reference(*args).shape == (3, 8) and 'pdmoe' in ALL_EXPERTS_FUNCTIONS\n"
        "try:\n    moe_mlp(*args)\nexcept ImportError:\n    print('refused')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "refused", proc.stderr[-3000:]
