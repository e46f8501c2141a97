"""How `MoEForCausalLM` chooses its experts implementation: transformers' experts interface, with the
PyTorch reference as the eager forward, "pdmoe" / "pdmoe_auto" reading the frozen/trainable pair,
pdmoe's names ("auto", "torch", "triton") for the three, never written to config.json."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import pdmoe.kernels.moe_op as moe_op
from pdmoe import MoEConfig, MoEForCausalLM
from pdmoe.config import EXPERTS_IMPLS
from pdmoe.errors import UsageError
from pdmoe.kernels import transformers_experts
from pdmoe.kernels.testing import tiny_transformers_moes
from pdmoe.tiny import TINY_SIZES

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**overrides) -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(
        MoEConfig(**{**TINY_SIZES, "num_hidden_layers": 2, "base_model_type": "qwen3", **overrides})
    )


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """One entry per forward call of the Triton kernels."""
    calls: list[int] = []
    gate_up_fwd = moe_op.gg.gate_up_fwd
    monkeypatch.setattr(
        moe_op.gg, "gate_up_fwd", lambda *args, **kwargs: calls.append(1) or gate_up_fwd(*args, **kwargs)
    )
    return calls


def _tokens() -> torch.Tensor:
    return torch.randint(0, TINY_SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))


def test_default_is_auto_and_runs_the_reference_off_cuda(kernel_calls):
    """ "auto" is the kernels on CUDA only: on the CPU it is the eager reference, even with the Triton
    interpreter on (as in this test session), and gives exactly the "torch" logits."""
    model = _model()
    assert model.config.experts_impl == "auto" and model.config._experts_implementation == "pdmoe_auto"
    auto = model(_tokens()).logits
    model.set_experts_implementation("torch")
    assert model.config.experts_impl == "torch" and all(
        b.experts.impl == "torch" for _, b in model.moe_blocks()
    )
    assert torch.equal(auto, model(_tokens()).logits)
    assert kernel_calls == []


def test_triton_trains_the_frozen_pair_like_the_reference(kernel_calls):
    """The kernels get the (frozen, trainable) pair: the reference's loss and gradients, none for
    the frozen experts."""
    grads = {}
    for impl in ("torch", "triton"):
        model = _model(experts_impl=impl, num_hidden_layers=1)
        model.freeze_original_experts()
        model(_tokens(), labels=_tokens()).loss.backward()
        experts = model.model.layers[0].mlp.experts
        assert experts.frozen_gate_up_proj.grad is None
        grads[impl] = (experts.trainable_gate_up_proj.grad, experts.trainable_down_proj.grad)
    assert len(kernel_calls) == 1  # the MoE layer, on the Triton path
    for got, want in zip(grads["triton"], grads["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_choice_is_per_load_and_never_saved(tmp_path):
    model = _model(experts_impl="triton")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {key for key in saved if "experts_impl" in key}
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.experts_impl == "auto"
    chosen = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="pdmoe")
    assert chosen.config.experts_impl == "triton"  # transformers' name, reported by pdmoe's


def test_config_json_from_before_is_read_and_not_written_again(tmp_path):
    """Older checkpoints have "experts_impl" in config.json: it still chooses, and is not saved back."""
    _model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "experts_impl": "torch"}))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.experts_impl == "torch"
    assert "experts_impl" not in model.config.to_dict()


def test_implementations_that_cannot_read_the_frozen_pair_are_refused():
    """transformers' own implementations (grouped_mm, ...) read fused weights only."""
    for name in ("fast", "grouped_mm"):
        with pytest.raises(
            UsageError, match=f"unknown experts implementation '{name}'; use one of auto, torch"
        ):
            _model(experts_impl=name)
    with pytest.raises(UsageError, match="unknown experts implementation 'grouped_mm'"):
        _model().set_experts_implementation("grouped_mm")


@pytest.mark.parametrize("name", sorted(tiny_transformers_moes()))
def test_pdmoe_auto_on_a_transformers_model_off_cuda_is_its_eager_forward(name, tmp_path, kernel_calls):
    cls, config = tiny_transformers_moes()[name]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = {
        impl: cls.from_pretrained(tmp_path, experts_implementation=impl)(ids).logits
        for impl in ("eager", "pdmoe_auto")
    }
    assert torch.equal(logits["pdmoe_auto"], logits["eager"]) and kernel_calls == []


def test_pdmoe_names_map_to_the_registered_implementations():
    assert EXPERTS_IMPLS == {
        "auto": transformers_experts.AUTO_NAME,
        "torch": "eager",
        "triton": transformers_experts.NAME,
    }
    assert {transformers_experts.NAME, transformers_experts.AUTO_NAME} <= set(ALL_EXPERTS_FUNCTIONS)
