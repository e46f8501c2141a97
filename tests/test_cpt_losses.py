"""The LPR loss and the stage → trainable-parts rules of pdmoe.cpt."""

from __future__ import annotations

import math

import pytest
import torch

from pdmoe.cpt.freezing import trainable_parts
from pdmoe.cpt.losses import language_prior_loss
from pdmoe.errors import Option, Problem, UsageError


def test_lpr_loss_is_mean_negative_log_prob_of_expert_zero_over_original_tokens():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 9.0, 0.0, 0.0]])
    original = torch.tensor([True, True, False])  # the new-language token (row 2) does not count
    p0 = torch.softmax(logits, -1)[:, 0]
    expected = -(math.log(p0[0]) + math.log(p0[1])) / 2
    second_layer = torch.zeros(3, 4)  # uniform router: −log 1/4
    loss = language_prior_loss((logits, second_layer), original)
    assert loss.item() == pytest.approx((expected + math.log(4)) / 2, rel=1e-6)
    # Two original experts: −log(p0 + p1).
    two = language_prior_loss((second_layer,), original, num_original_experts=2)
    assert two.item() == pytest.approx(math.log(2), rel=1e-6)


def test_lpr_loss_gradient_raises_expert_zero_and_is_zero_without_original_tokens():
    logits = torch.zeros(4, 4, requires_grad=True)
    language_prior_loss((logits,), torch.tensor([True, False, True, False])).backward()
    assert (logits.grad[[0, 2], 0] < 0).all() and (logits.grad[[0, 2], 1:] > 0).all()
    assert (logits.grad[[1, 3]] == 0).all()
    none = language_prior_loss((logits,), torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0 and none.requires_grad


def test_trainable_parts_per_stage_and_override():
    assert trainable_parts("cpt") == ("routers", "new_experts")
    assert trainable_parts("review") == ("routers",)
    assert trainable_parts("cpt", "new_experts, routers,non_moe") == ("routers", "new_experts", "non_moe")
    with pytest.raises(
        UsageError, match=r"comma list of routers, new_experts, original_experts, non_moe"
    ) as caught:
        trainable_parts("cpt", "attention")
    assert caught.value.problem is Problem.INVALID and caught.value.options == (Option("trainable"),)
    with pytest.raises(UsageError, match=r"needs new_experts too") as caught:
        trainable_parts("cpt", "original_experts")
    assert caught.value.problem is Problem.INVALID
    assert caught.value.options == (Option("trainable", "original_experts"),)
    with pytest.raises(UsageError, match=r"must be one of cpt, review, not 'sft'") as caught:
        trainable_parts("sft")
    assert caught.value.problem is Problem.INVALID and caught.value.options == (Option("stage"),)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_is_the_switch_form_one_kth_of_transformers(top_k):
    """Per layer, transformers' (and MoE-LPR's) k-slot form is exactly k times pdmoe's; the default
    coefficient 0.01·k therefore pushes as hard as their 0.01."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from pdmoe.config import MoEConfig
    from pdmoe.load_balancing import load_balancing_loss

    logits = torch.randn(64, 4, generator=torch.Generator().manual_seed(top_k))
    theirs = load_balancing_loss_func((logits,), 4, top_k)
    assert theirs.item() == pytest.approx(top_k * load_balancing_loss((logits,), top_k).item(), rel=1e-6)
    config = MoEConfig(base_model_type="llama", num_experts=4, num_experts_per_tok=top_k, num_hidden_layers=2)
    assert config.router_aux_loss_coef == pytest.approx(0.01 * top_k)


@pytest.mark.parametrize(("p0", "ratio"), [(0.25, 4.0), (0.2, 5.0), (0.05, 18.8)])
def test_lpr_gradient_against_moe_lpr_cross_entropy_on_probabilities(p0, ratio):
    """−log p0 pulls about 1/p0 times harder than MoE-LPR's cross-entropy of the probabilities."""
    rest = (1 - p0) / 3
    logits = torch.tensor([[p0, rest, rest, rest]], dtype=torch.float64).log().requires_grad_(True)
    ours = torch.autograd.grad(language_prior_loss((logits,), torch.tensor([True])), logits)[0]
    probs = torch.softmax(logits, -1)
    theirs = torch.autograd.grad(torch.nn.functional.cross_entropy(probs, torch.tensor([0])), logits)[0]
    assert (ours.norm() / theirs.norm()).item() == pytest.approx(ratio, rel=0.02)
