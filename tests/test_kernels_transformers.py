"""The "pdmoe" transformers experts implementation on tiny random Mixtral / Qwen3-MoE models:
accepted by ``from_pretrained(..., experts_implementation="pdmoe")``, runs the Triton kernels
(interpreter here), and gives the eager implementation's logits and expert gradients."""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
from pathlib import Path

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


def test_top_level_kernels_import_is_the_library_or_empty():
    """transformers imports the Hugging Face ``kernels`` library (5.25 requires it); with the repository
    root on sys.path that name finds this directory, which must then hand over to the library when it
    is installed, or else stay empty and register nothing a second time."""
    code = (
        "import importlib.util, json, kernels; "
        "print(json.dumps([kernels.__file__, sorted(getattr(kernels, '__all__', ['?']))]))"
    )
    root = Path(__file__).resolve().parents[1]
    # run from the repository root, where `python -c` puts the root first on sys.path
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    where, exported = json.loads(out.stdout)
    installed = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != root]
    )
    if installed is None:
        assert where == str(root / "kernels" / "__init__.py") and exported == []
    else:
        assert not where.startswith(str(root / "kernels")), where
        transformers_hub = subprocess.run(
            [sys.executable, "-c", "import transformers.integrations.hub_kernels"],
            cwd=root,
            capture_output=True,
        )
        assert transformers_hub.returncode == 0, transformers_hub.stderr.decode()[-2000:]
