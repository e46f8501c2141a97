"""Graft rules on hand-made checkpoints: dense ParamDelta, SCALE, dtypes, vocabulary, tied embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pdmoe.graft import GraftOptions, graft
from pdmoe.graft.planner import Role
from tests.graft_checkpoints import (
    dense_config,
    dense_tensors,
    load_dir,
    make,
    perturb,
    reference_graft,
    save_checkpoint,
)


def assert_matches(out: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_dir(out)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.3, 0.0])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_param_delta_and_scale(tmp_path: Path, scale: float, moe: bool) -> None:
    base, instruct, cpt = make(tmp_path, moe=moe)
    report = graft(base, instruct, cpt, tmp_path / "out", GraftOptions(scale=scale))
    assert_matches(tmp_path / "out", reference_graft(base, instruct, cpt, scale=scale))
    assert report.plan.counts()["expert_delta"] == (4 if moe else 0)
    assert json.loads((tmp_path / "out" / "graft.json").read_text())["alpha"] == scale
    if scale == 0.0:  # nothing added: CPT comes back unchanged
        assert_matches(tmp_path / "out", load_dir(cpt))


def test_bf16_inputs_computed_in_float32_rounded_once(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path, dtype=torch.bfloat16, moe=True)
    graft(base, instruct, cpt, tmp_path / "out", GraftOptions(scale=0.3))
    got = load_dir(tmp_path / "out")
    exact = reference_graft(base, instruct, cpt, scale=0.3, work=torch.float32)
    assert_matches(tmp_path / "out", exact)
    precise = reference_graft(base, instruct, cpt, scale=0.3, dtype=torch.float64)
    for name, tensor in precise.items():  # one rounding: within one bf16 step of the exact value
        torch.testing.assert_close(got[name].double(), tensor, rtol=2**-8, atol=0, msg=name)


def test_output_dtype_option(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)
    graft(base, instruct, cpt, tmp_path / "out", GraftOptions(dtype="bf16"))
    assert_matches(tmp_path / "out", reference_graft(base, instruct, cpt, dtype=torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_skip_embeddings_keeps_cpt_values(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)
    report = graft(base, instruct, cpt, tmp_path / "out", GraftOptions(skip_embeddings=True))
    assert_matches(tmp_path / "out", reference_graft(base, instruct, cpt, skip_embeddings=True))
    got, cpt_tensors = load_dir(tmp_path / "out"), load_dir(cpt)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name], cpt_tensors[name])
    assert report.plan.counts()["embedding_kept"] == 2


def test_cpt_extended_vocabulary(tmp_path: Path) -> None:
    """BASE's rows get the delta, CPT's new rows stay; tokenizer from CPT, chat template from INSTRUCT."""
    base, instruct, cpt = make(tmp_path, moe=True, cpt_vocab=24)
    report = graft(base, instruct, cpt, tmp_path / "out")
    out = tmp_path / "out"
    assert_matches(out, reference_graft(base, instruct, cpt))
    got, cpt_tensors = load_dir(out), load_dir(cpt)
    assert torch.equal(got["lm_head.weight"][20:], cpt_tensors["lm_head.weight"][20:])
    assert report.plan.tokenizer_source is Role.CPT
    assert (out / "tokenizer.json").read_bytes() == (cpt / "tokenizer.json").read_bytes()
    assert (out / "chat_template.jinja").read_text() == "instruct template"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "{{ instruct }}"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 24
    manifest = json.loads((out / "graft.json").read_text())
    assert manifest["vocabulary"] == {"base": 20, "instruct": 20, "cpt": 24, "output": 24}
    assert manifest["tokenizer_from"] == "cpt"


@pytest.mark.parametrize("skip_embeddings", [False, True])
def test_instruct_extended_vocabulary(tmp_path: Path, skip_embeddings: bool) -> None:
    """Tokens INSTRUCT added (chat markers) are appended with INSTRUCT's rows; vocab_size follows."""
    base, instruct, cpt = make(tmp_path, moe=True, instruct_vocab=22)
    report = graft(base, instruct, cpt, tmp_path / "out", GraftOptions(skip_embeddings=skip_embeddings))
    out = tmp_path / "out"
    assert_matches(out, reference_graft(base, instruct, cpt, skip_embeddings=skip_embeddings))
    got, instruct_tensors = load_dir(out), load_dir(instruct)
    assert got["model.embed_tokens.weight"].shape == (22, 8)
    assert torch.equal(
        got["model.embed_tokens.weight"][20:], instruct_tensors["model.embed_tokens.weight"][20:]
    )
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 22
    assert report.plan.tokenizer_source is Role.INSTRUCT
    assert (out / "tokenizer.json").read_bytes() == (instruct / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_tied_embeddings(tmp_path: Path, moe: bool) -> None:
    base, instruct, cpt = make(tmp_path, tied=True, moe=moe)
    graft(base, instruct, cpt, tmp_path / "out")
    expected = reference_graft(base, instruct, cpt)
    assert "lm_head.weight" not in expected
    assert_matches(tmp_path / "out", expected)


def test_untied_cpt_head_takes_the_tied_embeddings_delta(tmp_path: Path) -> None:
    base, instruct, _ = make(tmp_path, tied=True)
    cpt_tensors = perturb(dense_tensors(), seed=3)
    cpt = save_checkpoint(tmp_path / "cpt_untied", cpt_tensors, dense_config())
    graft(base, instruct, cpt, tmp_path / "out")
    got, b, i = load_dir(tmp_path / "out"), load_dir(base), load_dir(instruct)
    key = "model.embed_tokens.weight"
    expected = (cpt_tensors["lm_head.weight"].double() + i[key].double() - b[key].double()).float()
    assert torch.equal(got["lm_head.weight"], expected)


def test_sharded_inputs_and_outputs(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path, moe=True, shard_bytes=2000)
    report = graft(base, instruct, cpt, tmp_path / "out", GraftOptions(shard_size=3000))
    out = tmp_path / "out"
    assert len(report.plan.shards) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(
        p.name for p in out.glob("model-*.safetensors")
    )
    assert index["metadata"]["total_size"] == report.plan.total_bytes
    assert_matches(out, reference_graft(base, instruct, cpt))


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)
    report = graft(base, instruct, cpt, tmp_path / "out", dry_run=True)
    assert not (tmp_path / "out").exists()
    text = report.summary()
    assert "model.layers.0.mlp.experts.gate_up_proj  expert_delta" in text
    assert "model.layers.0.mlp.gate.weight  router" in text


def test_config_fields_only_one_side_spells_out_are_no_mismatch(tmp_path: Path) -> None:
    base, instruct, cpt = make(tmp_path, moe=True)
    config = json.loads((cpt / "config.json").read_text())
    (cpt / "config.json").write_text(
        json.dumps(config | {"head_dim": 4})
    )  # derived, absent from BASE's config
    graft(base, instruct, cpt, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["head_dim"] == 4


def test_zero_element_tensors(tmp_path: Path) -> None:
    inputs = make(tmp_path, moe=True, shard_bytes=2000)
    for directory in inputs:
        tensors = load_dir(directory) | {"model.empty": torch.zeros(0, 8), "a.empty": torch.zeros(0)}
        for path in directory.glob("model*.safetensors*"):
            path.unlink()
        save_checkpoint(
            directory, tensors, json.loads((directory / "config.json").read_text()), shard_bytes=2000
        )
    graft(*inputs, tmp_path / "out", GraftOptions(shard_size=2000))
    assert_matches(tmp_path / "out", reference_graft(*inputs))
    assert load_dir(tmp_path / "out")["model.empty"].shape == (0, 8)
