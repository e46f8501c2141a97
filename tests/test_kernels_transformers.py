"""The "pdmoe" transformers experts implementation on tiny random Mixtral / Qwen3-MoE models:
accepted by ``from_pretrained(..., experts_implementation="pdmoe")``, runs the Triton kernels
(interpreter here), and gives the eager implementation's logits and expert gradients."""

from __future__ import annotations

import importlib

import pytest
import torch

import pdmoe.kernels.moe_op as moe_op
from pdmoe.kernels import moe_mlp  # noqa: F401  (importing the package registers "pdmoe")
from pdmoe.kernels.testing import tiny_transformers_moes

MODELS = tiny_transformers_moes()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pdmoe_experts_match_eager(name, tmp_path, monkeypatch):
    cls, config = MODELS[name]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    eager = cls.from_pretrained(tmp_path, experts_implementation="eager", dtype=torch.float32)
    fused = cls.from_pretrained(tmp_path, experts_implementation="pdmoe", dtype=torch.float32)
    assert fused.config._experts_implementation == "pdmoe"

    calls = []
    gate_up_fwd = moe_op.gg.gate_up_fwd
    monkeypatch.setattr(moe_op.gg, "gate_up_fwd", lambda *a, **kw: calls.append(1) or gate_up_fwd(*a, **kw))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    out_eager, out_fused = eager(ids, labels=ids), fused(ids, labels=ids)
    assert len(calls) == config.num_hidden_layers
    torch.testing.assert_close(out_fused.logits, out_eager.logits, rtol=1e-4, atol=1e-4)

    out_eager.loss.backward()
    out_fused.loss.backward()
    for param in ("gate_up_proj", "down_proj"):
        got = getattr(fused.model.layers[0].mlp.experts, param).grad
        want = getattr(eager.model.layers[0].mlp.experts, param).grad
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_top_level_kernels_import_stays_empty():
    """transformers probes for the HF ``kernels`` library by importing ``kernels``; with the repo root on
    sys.path that finds this directory, which must then register nothing a second time."""
    try:
        shadow = importlib.import_module("kernels")
    except ImportError:
        pytest.skip("repository root not on sys.path")
    if shadow.__name__ != "kernels" or not shadow.__file__.endswith("kernels/__init__.py"):
        pytest.skip("another 'kernels' package is installed")
    assert shadow.__all__ == [] and not hasattr(shadow, "moe_mlp")
