"""pdmoe.cpt training on a tiny upcycled model (CPU): learning, freezing, review stage, resume, 2 processes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import pdmoe  # noqa: F401  (registers the MoE with the Auto classes)
from pdmoe.cpt import TrainConfig, train
from pdmoe.cpt.data import PackedSequences, corpus_spec
from pdmoe.cpt.evaluate import evaluate_model
from pdmoe.errors import CheckpointError, UsageError
from pdmoe.tiny import build_tiny_dense
from pdmoe.upcycle import upcycle

FR = [
    "le",
    "chat",
    "est",
    "sur",
    "le",
    "tapis",
    "et",
    "le",
    "chien",
    "court",
    "au",
    "parc",
    "avec",
    "la",
    "souris",
]
EN = [
    "the",
    "cat",
    "sat",
    "on",
    "the",
    "mat",
    "and",
    "the",
    "dog",
    "ran",
    "to",
    "the",
    "park",
    "with",
    "a",
    "mouse",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_words(path: Path, words: list[str], docs: int, lang: str | None, seed: int) -> Path:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(24)) for _ in range(docs)]
    if path.suffix == ".jsonl":
        path.write_text(
            "".join(json.dumps({"text": t, **({"lang": lang} if lang else {})}) + "\n" for t in texts)
        )
    else:
        path.write_text("\n\n".join(texts) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cpt")
    dense = build_tiny_dense(root / "dense", "llama", seed=0)
    return {
        "root": root,
        "dense": dense,
        "moe": upcycle(dense, root / "moe", num_experts=4, top_k=2),
        "fr": _write_words(root / "fr.jsonl", FR, 120, "fr", seed=1),
        "en": _write_words(root / "en.txt", EN, 60, None, seed=2),
        "cache": root / "cache",
    }


def _config(setup, out: str, **overrides) -> TrainConfig:
    settings = dict(
        model=setup["moe"],
        data=[setup["fr"]],
        out=setup["root"] / out,
        new_langs=["fr"],
        seq_len=32,
        micro_batch_size=4,
        max_steps=30,
        lr=3e-3,
        warmup_steps=2,
        log_every=5,
        save_every=1000,
        cache_dir=setup["cache"],
        progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cpt_run(setup) -> Path:
    return train(_config(setup, "cpt", eval_data=[setup["fr"]], eval_every=15, eval_max_sequences=8))


def test_cpt_loss_decreases_on_learnable_text(cpt_run):
    records = [r for r in _metrics(cpt_run) if "loss" in r]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    last = records[-1]
    assert last["loss"] == pytest.approx(last["lm_loss"] + 0.02 * last["aux_loss"], rel=1e-6)
    assert last["tokens_per_s"] > 0 and last["tokens_seen"] == 30 * 4 * 32
    shares = last["expert_load"]["fr"]
    assert set(shares) == {"0", "1", "2"} and all(
        sum(s) == pytest.approx(1, abs=1e-4) for s in shares.values()
    )
    evals = [r for r in _metrics(cpt_run) if "eval" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[1]["eval"]["perplexity"]["fr"] < evals[0]["eval"]["perplexity"]["fr"]
    assert evals[1]["eval"]["tokens"]["fr"] == 8 * 31


def test_cpt_changes_only_new_experts_and_routers(setup, cpt_run):
    before, after = _tensors(setup["moe"]), _tensors(cpt_run)
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
    config = _config(
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
    before, after = _tensors(cpt_run), _tensors(out)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.endswith(".mlp.gate.weight")}
    en = spec_before.languages.index("en")
    share_before = spec_before.expert_counts[:, en, 0].sum() / spec_before.expert_counts[:, en].sum()
    share_after = spec_after.expert_counts[:, en, 0].sum() / spec_after.expert_counts[:, en].sum()
    assert share_after > share_before + 0.1, (share_before, share_after)
    assert all(r["lpr_loss"] > 0 for r in _metrics(out) if "loss" in r)


def _spec(config: TrainConfig):
    return corpus_spec(config.data, config.langs, config.original_langs, config.new_langs)


def test_killed_run_resumed_equals_uninterrupted_run(setup, monkeypatch):
    common = dict(max_steps=10, save_every=4, log_every=2)
    whole = train(_config(setup, "whole", **common))

    calls = {"n": 0}
    batch = PackedSequences.batch

    def dies_in_step_seven(self, indices):
        calls["n"] += 1
        if calls["n"] > 6:  # one micro-batch per step: killed inside step 7, after the step-4 checkpoint
            raise KeyboardInterrupt
        return batch(self, indices)

    killed = _config(setup, "killed", **common)
    with monkeypatch.context() as patch:
        patch.setattr(PackedSequences, "batch", dies_in_step_seven)
        with pytest.raises(KeyboardInterrupt):
            train(killed)
    assert not (killed.out / "model.safetensors").exists()
    assert sorted(p.name for p in (killed.out / "checkpoints").iterdir()) == ["step-00000004"]
    resumed = train(_config(setup, "killed", resume="latest", **common))

    expected, got = _tensors(whole), _tensors(resumed)
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after resume"
    steps = [r["step"] for r in _metrics(resumed)]
    assert steps == [2, 4, 6, 8, 10] == [r["step"] for r in _metrics(whole)]


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_checkpoints(setup):
    config = _config(setup, "mismatch", max_steps=4, save_every=2)
    train(config)
    with pytest.raises(
        UsageError, match=r"does not match this run's settings \(lr: checkpoint 0.003, this run 0.001"
    ):
        train(_config(setup, "mismatch", max_steps=4, save_every=2, lr=1e-3, resume="latest"))
    with pytest.raises(UsageError, match=r"already holds training checkpoints; pass --resume"):
        train(config)
    with pytest.raises(CheckpointError, match=r"not a training checkpoint"):
        train(_config(setup, "mismatch", max_steps=4, save_every=2, resume=str(setup["moe"])))


def test_bad_model_and_sequence_length(setup):
    with pytest.raises(
        UsageError, match=r"is a dense 'llama' model, not an upcycled MoE; run `pdmoe upcycle"
    ):
        train(_config(setup, "dense", model=setup["dense"]))
    with pytest.raises(
        UsageError, match=r"--seq-len 512 is larger than the model's maximum \(256 positions\)"
    ):
        train(_config(setup, "long", seq_len=512))
    with pytest.raises(UsageError, match=r"review stage needs original-language text"):
        train(_config(setup, "review-no-original", stage="review"))


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


def test_two_processes_match_one_with_the_same_global_batch(setup):
    common = dict(max_steps=4, micro_batch_size=2, log_every=2)
    one = train(_config(setup, "one-process", grad_accum=2, **common))
    out = setup["root"] / "two-processes"
    # accelerate's --cpu launcher starts one process (more need mpirun); its torchrun launcher
    # (--multi_gpu) with ACCELERATE_USE_CPU=1 gives 2 CPU processes over gloo (MULTI_CPU).
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_cpu_threads_per_process",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "pdmoe.cpt",
        "--model",
        str(setup["moe"]),
        "--data",
        str(setup["fr"]),
        "--out",
        str(out),
        "--new-langs",
        "fr",
        "--seq-len",
        "32",
        "--micro-batch-size",
        "2",
        "--grad-accum",
        "1",
        "--max-steps",
        "4",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--log-every",
        "2",
        "--cache-dir",
        str(setup["cache"]),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _metrics(out)[-1]["tokens_seen"] == 4 * 4 * 32, "the two processes did not train as one"
    expected, got = _tensors(one), _tensors(out)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(_metrics(one), _metrics(out), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["expert_load"] == b["expert_load"]


def test_bf16_checkpoint_keeps_its_dtype_and_frozen_bits(setup):
    dense = build_tiny_dense(setup["root"] / "dense-bf16", "qwen3", seed=3, dtype=torch.bfloat16)
    moe = upcycle(dense, setup["root"] / "moe-bf16", num_experts=4, top_k=2, layers="0,2")
    out = train(_config(setup, "cpt-bf16", model=moe, max_steps=3, bf16="no"))
    before, after = _tensors(moe), _tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    for name, tensor in before.items():
        if ".mlp.experts." in name:
            assert torch.equal(tensor[0], after[name][0])
        elif not name.endswith(".mlp.gate.weight"):
            assert torch.equal(tensor, after[name]), name
    assert json.loads((out / "config.json").read_text())["moe_layers"] == [0, 2]
