"""The LPR loss and the stage → trainable-parts rules of pdmoe.cpt."""

from __future__ import annotations

import math

import pytest
import torch

from pdmoe.cpt.freezing import trainable_parts
from pdmoe.cpt.losses import language_prior_loss
from pdmoe.errors import UsageError


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
    with pytest.raises(UsageError, match=r"comma list of routers, new_experts, original_experts, non_moe"):
        trainable_parts("cpt", "attention")
    with pytest.raises(UsageError, match=r"original_experts needs new_experts"):
        trainable_parts("cpt", "original_experts")
    with pytest.raises(UsageError, match=r"--stage must be one of cpt, review"):
        trainable_parts("sft")
