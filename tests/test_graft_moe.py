"""The DeltaMoE graft on the real pipeline: tiny model -> `pdmoe upcycle` -> fake CPT -> graft."""

from __future__ import annotations

import json

import pytest
import torch

from pdmoe import MoEConfig, MoEForCausalLM
from pdmoe.graft import graft
from tests.graft_checkpoints import Pipeline, load_dir, real_pipeline, reference_graft


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return real_pipeline(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def grafted(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("grafted") / "out"
    report = graft(pipeline.base, pipeline.instruct, pipeline.cpt, out)
    return out, report


def test_every_tensor_equals_the_recomputation(pipeline: Pipeline, grafted) -> None:
    out, _ = grafted
    expected = reference_graft(pipeline.base, pipeline.instruct, pipeline.cpt)
    got = load_dir(out)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_method_invariants(pipeline: Pipeline, grafted) -> None:
    """Shared weights and expert 0 equal INSTRUCT's bit for bit; routers equal CPT's."""
    out, report = grafted
    got, instruct, cpt = load_dir(out), load_dir(pipeline.instruct), load_dir(pipeline.cpt)
    layers = json.loads((pipeline.cpt / "config.json").read_text())["moe_layers"]
    assert report.plan.moe_layers == layers
    for name, tensor in got.items():
        if name in instruct:
            assert torch.equal(tensor, instruct[name]), name
        elif name.endswith("mlp.gate.weight"):
            assert torch.equal(tensor, cpt[name]), name
    for layer in layers:
        mlp = f"model.layers.{layer}.mlp"
        gate_up = torch.cat([instruct[f"{mlp}.gate_proj.weight"], instruct[f"{mlp}.up_proj.weight"]])
        assert torch.equal(got[f"{mlp}.experts.gate_up_proj"][0], gate_up)
        assert torch.equal(got[f"{mlp}.experts.down_proj"][0], instruct[f"{mlp}.down_proj.weight"])
        # the new experts moved in CPT: they are CPT's experts plus the same delta, not INSTRUCT's FFN
        assert not torch.equal(got[f"{mlp}.experts.down_proj"][1], instruct[f"{mlp}.down_proj.weight"])


def test_side_files_and_manifest(pipeline: Pipeline, grafted) -> None:
    out, report = grafted
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (pipeline.cpt / "config.json").read_text()
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (pipeline.instruct / name).read_bytes(), name
    manifest = json.loads((out / "graft.json").read_text())
    assert manifest["alpha"] == 1.0
    assert manifest["counts"] == {
        "shared_delta": 21,
        "expert_delta": 6,
        "router": 3,
        "cpt_only": 0,
        "embedding_kept": 0,
    }
    assert manifest["counts"] == report.plan.counts()
    assert manifest["inputs"]["cpt"]["path"] == str(pipeline.cpt.resolve())
    assert set(manifest["inputs"]["base"]["header_sha256"]) == {"model.safetensors"}
    assert manifest["tokenizer_from"] == "instruct"
    assert "pdmoe_version" in manifest


def test_grafted_moe_loads_with_transformers(pipeline: Pipeline, grafted) -> None:
    """transformers' Auto class loads the output as pdmoe's model, and it computes what an
    MoEForCausalLM holding the independently recomputed graft computes."""
    from transformers import AutoModelForCausalLM  # importing pdmoe registered the MoE model with it

    out, _ = grafted
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, MoEForCausalLM)
    expected = MoEForCausalLM(MoEConfig.from_pretrained(out)).eval()
    expected.load_state_dict(reference_graft(pipeline.base, pipeline.instruct, pipeline.cpt), strict=True)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected(tokens).logits)


def test_tied_embeddings_on_the_real_pipeline(tmp_path) -> None:
    tied = real_pipeline(tmp_path, tied=True)
    graft(tied.base, tied.instruct, tied.cpt, tmp_path / "out")
    expected = reference_graft(tied.base, tied.instruct, tied.cpt)
    got = load_dir(tmp_path / "out")
    assert "lm_head.weight" not in got and got.keys() == expected.keys()
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
    assert torch.equal(got["model.embed_tokens.weight"], load_dir(tied.instruct)["model.embed_tokens.weight"])
