"""The memory plan of ``pdmoe cpt``: activations against the tensors torch saves for backward (CPU),
``--dry-run`` from config.json alone, a run that does not fit refused before any weight is read,
and README's table. (Weights, gradients and optimizer state against what FSDP2 processes hold:
tests/test_cpt_distributed.py.)"""

from __future__ import annotations

import argparse
import collections
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import pdmoe.cpt.trainer as trainer
from pdmoe.cli import flag_spelling
from pdmoe.cli.cpt import add_cpt_arguments
from pdmoe.config import MoEConfig, moe_config_dict
from pdmoe.cpt import train
from pdmoe.cpt.__main__ import main as cpt_main
from pdmoe.cpt.freezing import Stage, apply_trainable, trainable_parts
from pdmoe.cpt.memory_plan import (
    GB,
    RunShape,
    activation_bytes_per_token,
    fewest_processes,
    meta_model,
    plan_memory,
)
from pdmoe.cpt.settings import TrainConfig
from pdmoe.cpt.trainer import enable_activation_checkpointing
from pdmoe.errors import Option, Problem, UsageError
from pdmoe.layout import layer_index
from pdmoe.modeling import MoEForCausalLM
from pdmoe.options import parse_size
from tests.cpt_runs import build_setup, command_line, train_config

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL_CONFIGS = Path(__file__).with_name("model_configs")
README = Path(__file__).parents[1] / "README.md"
TOKENS = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return build_setup(tmp_path_factory.mktemp("cpt-memory"))


def _saved_for_backward(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, int]:
    """Bytes of the tensors a training forward keeps for backward (weights excluded, each storage
    once, plus the logits the output holds), and of the decoder layer that keeps the most."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers, saved, per_layer = [None], {}, collections.Counter()

    def leave(module: torch.nn.Module, args: tuple, output: object) -> None:
        layers.pop()

    for name, module in model.named_modules():
        index = layer_index(f"{name}.")
        module.register_forward_pre_hook(lambda m, a, i=index: layers.append(layers[-1] if i is None else i))
        module.register_forward_hook(leave)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in saved:
            saved[storage.data_ptr()] = storage.nbytes()
            if layers[-1] is not None:
                per_layer[layers[-1]] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(input_ids=ids, labels=ids, output_router_logits=True).logits.untyped_storage()
    kept = sum(saved.values()) + (0 if logits.data_ptr() in saved else logits.nbytes())
    return kept, max(per_layer.values())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_planned_activations_are_within_25_percent_of_the_saved_tensors(family, dtype, checkpointing):
    dense = dict(
        model_type=family,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    config = moe_config_dict(dense, num_experts=4, num_experts_per_tok=2)
    parts = trainable_parts(Stage.CPT)
    ids = torch.randint(0, 300, (1, TOKENS))
    kept, _ = _saved_for_backward(_training_model(config, parts, dtype, checkpointing), ids)
    if checkpointing:  # backward recomputes one layer at a time: the largest, as measured without
        kept += _saved_for_backward(_training_model(config, parts, dtype, False), ids)[1]
    shape = RunShape(parts, 1, TOKENS, checkpointing, dtype == torch.bfloat16)
    planned = TOKENS * activation_bytes_per_token(meta_model(config, parts), shape)
    assert planned == pytest.approx(kept, rel=0.25)


def _training_model(config: dict, parts, dtype: torch.dtype, checkpointing: bool) -> MoEForCausalLM:
    moe = MoEConfig(**config)
    moe.experts_impl = "torch"  # the reference experts, as on CPU
    torch.manual_seed(0)
    model = MoEForCausalLM(moe).to(dtype)
    model.config.use_cache = False
    apply_trainable(model, parts)
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def _config_only(root: Path, dense_name: str) -> Path:
    """A folder holding the config.json of a dense config upcycled to 4 experts, top-2, and nothing else."""
    dense = json.loads((MODEL_CONFIGS / f"{dense_name}.json").read_text())
    folder = root / dense_name
    folder.mkdir()
    config = moe_config_dict(dense, num_experts=4, num_experts_per_tok=2)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_dry_run_plans_from_config_json_alone(tmp_path, capsys):
    model = _config_only(tmp_path, "llama-3.1-8b")
    out = tmp_path / "out"
    args = ["--model", str(model), "--data", str(tmp_path / "absent.jsonl"), "--out", str(out)]
    args += ["--seq-len", "2048", "--micro-batch-size", "1", "--gradient-checkpointing", "--dry-run"]
    assert cpt_main([*args, "--num-processes", "8"]) == 0
    report = capsys.readouterr().out
    assert "FSDP2 on 8 processes, bf16 mixed precision, micro-batch 1 x 2048 tokens" in report
    for label in (
        "frozen weights",
        "trainable weights",
        "gradients",
        "optimizer state",
        "activations",
        "total",
    ):
        assert re.search(rf"^  {label}.* GB$", report, re.MULTILINE), label
    assert "fits in 80.0 GB per GPU; the fewest processes that fit: 4, FSDP2" in report
    assert cpt_main([*args, "--num-processes", "2"]) == 0
    assert "does NOT fit in 80.0 GB per GPU; the fewest processes that fit: 4" in capsys.readouterr().out
    for bad, message in (
        (["--num-processes", "0"], "--num-processes must be a whole number from 1 to 4096, got 0"),
        (["--gpu-memory", "lots"], "cannot read --gpu-memory 'lots'; write it like 5GB, 500MB or 2GiB"),
    ):
        assert cpt_main([*args, *bad]) == 2
        assert capsys.readouterr().err.strip() == f"pdmoe cpt: error: {message}"
    assert not out.exists()


def test_dry_run_names_the_options_to_change_as_its_caller_does(tmp_path):
    config = TrainConfig(
        model=_config_only(tmp_path, "llama-3.1-8b"),
        data=[tmp_path / "d.jsonl"],
        out=tmp_path,
        gpu_memory="1GB",
    )
    advice = "; no number of processes up to 4096 fits 1.0 GB: lower {} or {}, or add {}\n"
    report = trainer.dry_run(config, 1)
    assert advice.format("micro_batch_size", "seq_len", "gradient_checkpointing=True") in report
    parser = argparse.ArgumentParser()
    add_cpt_arguments(parser)
    report = trainer.dry_run(config, 1, flag_spelling(parser))
    assert advice.format("--micro-batch-size", "--seq-len", "--gradient-checkpointing") in report


def test_a_run_that_does_not_fit_stops_before_reading_any_weight(setup, monkeypatch, tmp_path, capsys):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(trainer, "load_moe_model", no_weights)
    config = train_config(setup, "too-big", gpu_memory="4.5MB")  # one process needs 5.5 MB
    message = (
        r"^the run needs 5\.5 MB per process on 1 process\(es\), more than the 4\.5 MB of {} "
        r"\(largest part: activations, 2\.4 MB\); the fewest processes that fit: 3, FSDP2 .*, 4\.\d MB each$"
    )
    with pytest.raises(UsageError, match=message.format("gpu_memory")) as caught:
        train(config)
    assert caught.value.problem is Problem.INVALID and caught.value.options == (Option("gpu_memory"),)
    assert not config.out.exists()
    assert cpt_main([*command_line(config), "--gpu-memory", "4.5MB"]) == 2
    assert re.match(
        message.format("--gpu-memory"), capsys.readouterr().err.removeprefix("pdmoe cpt: error: ")
    )
    with pytest.raises(UsageError, match=r"no number of processes up to 4096 fits 0\.0 MB: lower ") as caught:
        train(replace(config, gpu_memory="1000"))
    assert caught.value.options == (
        Option("gpu_memory"),
        Option("micro_batch_size"),
        Option("seq_len"),
        Option("gradient_checkpointing", True),
    )
    assert cpt_main([*command_line(config), "--gpu-memory", "1000"]) == 2
    assert capsys.readouterr().err.endswith(
        "; no number of processes up to 4096 fits 0.0 MB: lower --micro-batch-size or --seq-len, "
        "or add --gradient-checkpointing\n"
    )
    assert cpt_main([*command_line(config), "--gpu-memory", "lots"]) == 2
    assert not config.out.exists()


def _readme_rows() -> dict[str, list[str]]:
    table = README.read_text().split("<!-- memory-plan-table -->")[1]
    rows = [line.strip("|").split("|") for line in table.strip().splitlines()[2:] if line.startswith("|")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def test_readme_table_is_the_plan_of_the_public_configs(tmp_path):
    parts = trainable_parts(Stage.CPT)
    shape = RunShape(parts, 1, 2048, True, True)
    expected = {}
    for name, title in (
        ("llama-3.2-1b", "Llama-3.2-1B"),
        ("qwen2.5-7b", "Qwen2.5-7B"),
        ("llama-3.1-8b", "Llama-3.1-8B"),
        ("llama-3.1-70b", "Llama-3.1-70B"),
    ):
        config = json.loads((_config_only(tmp_path, name) / "config.json").read_text())
        model = meta_model(config, parts)
        best = fewest_processes(model, shape, parse_size("80GB"))
        eight = plan_memory(model, 8, shape, sharded=True)
        expected[title] = [str(best.num_processes), f"{best.total / GB:.1f}", f"{eight.total / GB:.1f}"]
    assert _readme_rows() == expected
