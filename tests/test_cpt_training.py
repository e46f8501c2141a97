"""pdmoe.cpt training on a tiny upcycled model (CPU): learning, freezing, review stage, resume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import pdmoe  # noqa: F401  (registers the MoE with the Auto classes)
from pdmoe.cli import flag_spelling
from pdmoe.cli.cpt import add_cpt_arguments
from pdmoe.cpt import TrainConfig, train
from pdmoe.cpt.data import PackedSequences, corpus_spec
from pdmoe.cpt.evaluate import evaluate_model
from pdmoe.errors import CheckpointError, Option, PdmoeError, Problem, UsageError
from pdmoe.tiny import build_tiny_dense
from pdmoe.upcycle import upcycle
from tests.cpt_runs import build_setup, metrics, tensors, train_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _as_cpt_prints(error: PdmoeError) -> str:
    """``error`` as the command line prints it: its options named by ``pdmoe cpt``'s flags."""
    parser = argparse.ArgumentParser()
    add_cpt_arguments(parser)
    return error.render(flag_spelling(parser))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return build_setup(tmp_path_factory.mktemp("cpt"))


@pytest.fixture(scope="module")
def cpt_run(setup) -> Path:
    return train(train_config(setup, "cpt", eval_data=[setup["fr"]], eval_every=15, eval_max_sequences=8))


def test_cpt_loss_decreases_on_learnable_text(cpt_run):
    records = [r for r in metrics(cpt_run) if "loss" in r]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    last = records[-1]
    assert last["loss"] == pytest.approx(last["lm_loss"] + 0.02 * last["aux_loss"], rel=1e-6)
    assert last["tokens_per_s"] > 0 and last["tokens_seen"] == 30 * 4 * 32
    shares = last["expert_load"]["fr"]
    assert set(shares) == {"0", "1", "2"} and all(
        sum(s) == pytest.approx(1, abs=1e-4) for s in shares.values()
    )
    evals = [r for r in metrics(cpt_run) if "eval" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[1]["eval"]["perplexity"]["fr"] < evals[0]["eval"]["perplexity"]["fr"]
    assert evals[1]["eval"]["tokens"]["fr"] == 8 * 31


def test_cpt_changes_only_new_experts_and_routers(setup, cpt_run):
    before, after = tensors(setup["moe"]), tensors(cpt_run)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        if name.endswith(".mlp.gate.weight"):
            assert not torch.equal(tensor, after[name]), f"router {name} did not train"
        elif ".mlp.experts." in name:
            assert torch.equal(tensor[0], after[name][0]), f"original expert 0 of {name} changed"
            assert not torch.equal(tensor[1:], after[name][1:]), f"new experts of {name} did not train"
        else:
            assert torch.equal(tensor, after[name]), f"frozen {name} changed"
    model = AutoModelForCausalLM.from_pretrained(cpt_run)
    assert type(model).__name__ == "MoEForCausalLM"
    assert json.loads((cpt_run / "config.json").read_text())["model_type"] == "pdmoe"
    assert (cpt_run / "tokenizer.json").is_file()


def test_review_stage_trains_routers_towards_expert_zero(setup, cpt_run):
    corpus = dict(original_langs=["en"], new_langs=["fr"])
    config = train_config(
        setup,
        "review",
        model=cpt_run,
        stage="review",
        data=[setup["fr"], setup["en"]],
        langs=["fr", "en"],
        max_steps=20,
        lr=2e-2,
        **corpus,
    )
    spec_before = evaluate_model(
        cpt_run, _spec(config), seq_len=32, max_sequences=None, cache_dir=setup["cache"]
    )
    out = train(config)
    spec_after = evaluate_model(out, _spec(config), seq_len=32, max_sequences=None, cache_dir=setup["cache"])
    before, after = tensors(cpt_run), tensors(out)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.endswith(".mlp.gate.weight")}
    en = spec_before.languages.index("en")
    share_before = spec_before.expert_counts[:, en, 0].sum() / spec_before.expert_counts[:, en].sum()
    share_after = spec_after.expert_counts[:, en, 0].sum() / spec_after.expert_counts[:, en].sum()
    assert share_after > share_before + 0.1, (share_before, share_after)
    assert all(r["lpr_loss"] > 0 for r in metrics(out) if "loss" in r)


def _spec(config: TrainConfig):
    return corpus_spec(config.data, config.langs, config.original_langs, config.new_langs)


def test_killed_run_resumed_equals_uninterrupted_run(setup, monkeypatch):
    common = dict(max_steps=10, save_every=4, log_every=2)
    whole = train(train_config(setup, "whole", **common))

    calls = {"n": 0}
    batch = PackedSequences.batch

    def dies_in_step_seven(self, indices):
        calls["n"] += 1
        if calls["n"] > 6:  # one micro-batch per step: killed inside step 7, after the step-4 checkpoint
            raise KeyboardInterrupt
        return batch(self, indices)

    killed = train_config(setup, "killed", **common)
    with monkeypatch.context() as patch:
        patch.setattr(PackedSequences, "batch", dies_in_step_seven)
        with pytest.raises(KeyboardInterrupt):
            train(killed)
    assert not (killed.out / "model.safetensors").exists()
    assert sorted(p.name for p in (killed.out / "checkpoints").iterdir()) == ["step-00000004"]
    resumed = train(train_config(setup, "killed", resume="latest", **common))

    expected, got = tensors(whole), tensors(resumed)
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after resume"
    steps = [r["step"] for r in metrics(resumed)]
    assert steps == [2, 4, 6, 8, 10] == [r["step"] for r in metrics(whole)]


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_checkpoints(setup):
    config = train_config(setup, "mismatch", max_steps=4, save_every=2)
    train(config)
    with pytest.raises(
        UsageError, match=r"does not match this run's settings \(lr: checkpoint 0.003, this run 0.001"
    ) as caught:
        train(train_config(setup, "mismatch", max_steps=4, save_every=2, lr=1e-3, resume="latest"))
    assert caught.value.problem is Problem.CONFLICT
    assert caught.value.options == (Option("resume"), Option("out"))
    with pytest.raises(UsageError, match=r"already holds training checkpoints") as caught:
        train(config)
    assert caught.value.problem is Problem.REFUSED
    assert caught.value.options == (Option("resume", "latest"), Option("overwrite", True))
    assert _as_cpt_prints(caught.value) == (
        f"{config.out} already holds training checkpoints; pass --resume latest to continue "
        "or --overwrite to restart"
    )
    with pytest.raises(CheckpointError, match=r"not a training checkpoint"):
        train(train_config(setup, "mismatch", max_steps=4, save_every=2, resume=str(setup["moe"])))


def test_bad_model_and_sequence_length(setup, capsys):
    with pytest.raises(
        UsageError, match=r"is a dense 'llama' model, not an upcycled MoE; run `pdmoe upcycle"
    ):
        train(train_config(setup, "dense", model=setup["dense"]))
    with pytest.raises(
        UsageError, match=r"512 is larger than the model's maximum \(256 positions\)"
    ) as caught:
        train(train_config(setup, "long", seq_len=512))
    assert caught.value.problem is Problem.INVALID and caught.value.options == (Option("seq_len"),)
    with pytest.raises(UsageError, match=r"review stage needs original-language text") as caught:
        train(train_config(setup, "review-no-original", stage="review"))
    assert caught.value.problem is Problem.MISSING and caught.value.options == (Option("original_langs"),)
    # The default length (the method's 1024) is capped at the model's 256 positions, with a note.
    out = train(train_config(setup, "default-length", seq_len=None, max_steps=1, log_every=1))
    assert (
        "sequences of 256 tokens, the model's maximum, instead of the default 1024" in capsys.readouterr().out
    )
    assert metrics(out)[0]["tokens_seen"] == 4 * 256


def test_gradient_checkpointing_keeps_router_gradients(setup):
    from pdmoe.cpt.checkpoints import load_moe_model
    from pdmoe.cpt.freezing import apply_trainable
    from pdmoe.cpt.trainer import enable_activation_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = load_moe_model(setup["moe"])
        apply_trainable(model, ("routers", "new_experts"))
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        calls = []
        model.model.layers[0].mlp.gate.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(calls) == (2 if checkpointing else 1), "the router was not recomputed in backward"
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and any(n.endswith("mlp.gate.weight") for n in plain)
    for name, grad in plain.items():
        assert checkpointed[name] is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_bf16_checkpoint_keeps_its_dtype_and_frozen_bits(setup):
    dense = build_tiny_dense(setup["root"] / "dense-bf16", "qwen3", seed=3, dtype=torch.bfloat16)
    moe = upcycle(dense, setup["root"] / "moe-bf16", num_experts=4, top_k=2, layers="0,2")
    out = train(train_config(setup, "cpt-bf16", model=moe, max_steps=3, bf16="no"))
    before, after = tensors(moe), tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    for name, tensor in before.items():
        if ".mlp.experts." in name:
            assert torch.equal(tensor[0], after[name][0])
        elif not name.endswith(".mlp.gate.weight"):
            assert torch.equal(tensor, after[name]), name
    assert json.loads((out / "config.json").read_text())["moe_layers"] == [0, 2]
