"""Router, load-balancing loss, loss wiring and expert freezing of `MoEForCausalLM`."""

from __future__ import annotations

import pytest
import torch

from pdmoe import MoEConfig, MoEForCausalLM
from pdmoe.errors import UsageError
from pdmoe.experts import StateDictLayout, fuse_split_experts
from pdmoe.layout import MoETensor
from pdmoe.load_balancing import load_balancing_loss
from pdmoe.router import TopKRouter
from pdmoe.tiny import TINY_SIZES


def _config(**overrides) -> MoEConfig:
    fields = {
        **TINY_SIZES,
        "num_hidden_layers": 2,
        "base_model_type": "qwen3",
        "experts_impl": "torch",
        **overrides,
    }
    return MoEConfig(**fields)


def _model(seed: int = 0, **overrides) -> MoEForCausalLM:
    torch.manual_seed(seed)
    return MoEForCausalLM(_config(**overrides))


def test_router_renormalises_top_k():
    torch.manual_seed(0)
    router = TopKRouter(hidden_size=16, num_experts=5, top_k=3)
    torch.nn.init.normal_(router.weight)
    logits, weights, ids = router(torch.randn(7, 16))
    probs = torch.softmax(logits.double(), dim=-1)
    expected = probs.gather(1, ids)
    assert torch.allclose(weights.double(), expected / expected.sum(1, keepdim=True), atol=1e-6)
    assert torch.equal(ids, probs.topk(3).indices)


def test_load_balancing_loss_matches_switch_formula_with_padding():
    torch.manual_seed(0)
    logits = (torch.randn(6, 4), torch.randn(6, 4))
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    real = mask.reshape(-1).bool()
    expected = []
    for layer in logits:
        probs = torch.softmax(layer.double(), -1)[real]
        chosen = probs.topk(2).indices
        fraction = torch.stack([(chosen == e).sum() for e in range(4)]).double() / chosen.numel()
        expected.append(4 * (fraction * probs.mean(0)).sum())
    got = load_balancing_loss(logits, top_k=2, attention_mask=mask)
    assert torch.allclose(got.double(), torch.stack(expected).mean(), atol=1e-6)
    # Balanced routing gives exactly 1: uniform probabilities, every expert chosen equally often.
    uniform = (torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.0, 0.0, 1.0, 0.9]]).log(),)
    assert torch.allclose(load_balancing_loss(uniform, top_k=2), torch.tensor(1.0), atol=0.05)


def test_loss_is_lm_loss_plus_weighted_aux_and_router_gets_gradient():
    model = _model(router_aux_loss_coef=0.5)
    tokens = torch.randint(0, 259, (2, 9))
    out = model(tokens, labels=tokens, output_router_logits=True)
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * out.aux_loss)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (18, 4)
    out.aux_loss.backward()
    assert all(block.gate.weight.grad.abs().sum() > 0 for _, block in model.moe_blocks())
    assert model(tokens).router_logits is None


def test_frozen_original_experts_get_no_gradient_and_keep_the_format():
    model = _model()
    tokens = torch.randint(0, 259, (2, 9))
    before = model(tokens).logits.detach()
    fused = {key: value.clone() for key, value in model.state_dict().items()}

    model.freeze_original_experts()
    assert torch.equal(model(tokens).logits.detach(), before)
    assert model.state_dict().keys() == fused.keys()
    assert all(torch.equal(model.state_dict()[key], fused[key]) for key in fused)

    model(tokens, labels=tokens).loss.backward()
    for _, block in model.moe_blocks():
        experts = block.experts
        frozen, trainable = experts.weights(MoETensor.GATE_UP)
        assert not frozen.requires_grad and frozen.grad is None
        assert trainable.grad is not None and trainable.grad.shape[0] == 3
        assert "trainable_gate_up_proj" in dict(experts.named_parameters())
        assert "gate_up_proj" not in dict(experts.named_parameters())
        # Each part owns only its own experts' memory: nothing keeps the fused storage alive (under
        # FSDP the trainable part is sharded and the frozen one must not pin all E experts).
        for part in (frozen, trainable):
            assert part.untyped_storage().nbytes() == part.numel() * part.element_size()

    # Sharded training uses the modules' own tensors as keys, and fuses them when it saves.
    model.set_experts_state_dict_layout(StateDictLayout.SPLIT)
    split = model.state_dict()
    assert "model.layers.0.mlp.experts.trainable_down_proj" in split
    assert "model.layers.0.mlp.experts.down_proj" not in split
    fused_again = fuse_split_experts(model, split)
    assert fused_again.keys() == fused.keys() and all(
        torch.equal(fused_again[key], fused[key]) for key in fused
    )
    model.set_experts_state_dict_layout(StateDictLayout.FUSED)

    # Loading the fused format into a frozen-split model fills both parts.
    other = _model(seed=1)
    other.freeze_original_experts()
    other.load_state_dict(fused)
    assert torch.equal(other(tokens).logits.detach(), before)
    other.unfreeze_experts()
    assert all(torch.equal(other.state_dict()[key], fused[key]) for key in fused)
    assert "gate_up_proj" in dict(other.model.layers[0].mlp.experts.named_parameters())


def test_freezing_needs_a_prefix_of_original_experts():
    model = _model(original_experts=[1])
    with pytest.raises(UsageError, match=r"original_experts must be a prefix 0\.\.n-1, got \[1\]"):
        model.freeze_original_experts()
