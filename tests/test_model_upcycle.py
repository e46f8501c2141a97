"""The upcycled MoE computes what the dense model computes, and its checkpoint follows docs/method.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import pdmoe
from pdmoe.families import FAMILIES
from pdmoe.modeling import CACHE_FIELD
from pdmoe.tiny import build_tiny_dense
from pdmoe.upcycle import upcycle

# Every registered family is checked; some with options that exercise more of their modules.
FAMILY_OPTIONS = {
    "mistral": {"sliding_window": 8},
    "qwen2": {"attention_bias": True, "tie_word_embeddings": True},
}


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {
        family: build_tiny_dense(root / family, family, **FAMILY_OPTIONS.get(family, {}))
        for family in FAMILIES
    }


@pytest.fixture(scope="module")
def moe_dirs(dense_dirs, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("moe")
    return {
        (family, layers): upcycle(dense, root / f"{family}-{layers.replace(':', '_')}", layers=layers)
        for family, dense in dense_dirs.items()
        for layers in ("all", "0,2")
    }


def _tokens(seed: int = 0, batch: int = 2, length: int = 13) -> torch.Tensor:
    return torch.randint(0, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layers", ["all", "0,2"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_upcycled_logits_equal_dense(dense_dirs, moe_dirs, family, layers):
    dense = AutoModelForCausalLM.from_pretrained(dense_dirs[family]).eval()
    moe = AutoModelForCausalLM.from_pretrained(moe_dirs[family, layers]).eval()
    assert isinstance(moe, pdmoe.MoEForCausalLM)
    expected_layers = [0, 1, 2] if layers == "all" else [0, 2]
    assert [index for index, _ in moe.moe_blocks()] == expected_layers
    tokens = _tokens()
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding exercises the attention mask path too
    with torch.no_grad():
        diff = (
            (dense(tokens, attention_mask=mask).logits - moe(tokens, attention_mask=mask).logits).abs().max()
        )
    assert diff.item() <= 1e-5


def test_legacy_rope_fields_as_llama_3_1_ships_them(tmp_path):
    """A dense config.json with ``rope_scaling`` + ``rope_theta`` (the hub's Llama 3.1 form, not
    transformers 5's ``rope_parameters``): its MoE loads and computes what the dense model does
    beyond the original context, where the scaling acts."""
    dense_dir = build_tiny_dense(tmp_path / "dense", "llama")
    config = json.loads((dense_dir / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 500000.0
    config["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    (dense_dir / "config.json").write_text(json.dumps(config))
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    moe = AutoModelForCausalLM.from_pretrained(upcycle(dense_dir, tmp_path / "moe")).eval()
    assert moe.config.rope_parameters == dense.config.rope_parameters
    tokens = _tokens(length=40)
    with torch.no_grad():
        assert (dense(tokens).logits - moe(tokens).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_equals_dense(dense_dirs, moe_dirs, family):
    dense = AutoModelForCausalLM.from_pretrained(dense_dirs[family]).eval()
    moe = AutoModelForCausalLM.from_pretrained(moe_dirs[family, "all"]).eval()
    prompt = _tokens(seed=1, batch=1, length=5)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "use_cache": True, "pad_token_id": 256}
    assert torch.equal(dense.generate(prompt, **kwargs), moe.generate(prompt, **kwargs))
    with torch.no_grad():  # generation reuses the KV cache the forward returns
        assert getattr(moe(prompt, use_cache=True), CACHE_FIELD).get_seq_length() == prompt.shape[1]


def test_checkpoint_follows_the_on_disk_contract(dense_dirs, moe_dirs):
    dense_dir, moe_dir = dense_dirs["qwen3"], moe_dirs["qwen3", "0,2"]
    dense = load_file(dense_dir / "model.safetensors")
    moe = load_file(moe_dir / "model.safetensors")
    dense_config = json.loads((dense_dir / "config.json").read_text())
    config = json.loads((moe_dir / "config.json").read_text())
    for key, value in dense_config.items():
        if key not in ("model_type", "architectures", "transformers_version"):
            assert config[key] == value, key
    assert config["model_type"] == "pdmoe" and config["base_model_type"] == "qwen3"
    assert config["architectures"] == ["MoEForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_layers"]) == (4, 2, [0, 2])
    assert config["original_experts"] == [0] and config["norm_topk_prob"] is True
    assert config["router_aux_loss_coef"] == 0.02  # the reference 0.01 in the k-slot form, at top-2

    hidden, inter = dense_config["hidden_size"], dense_config["intermediate_size"]
    for layer in range(3):
        prefix = f"model.layers.{layer}.mlp"
        if layer == 1:
            for part in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(moe[f"{prefix}.{part}.weight"], dense[f"{prefix}.{part}.weight"])
            continue
        assert moe[f"{prefix}.gate.weight"].shape == (4, hidden)
        gate_up, down = moe[f"{prefix}.experts.gate_up_proj"], moe[f"{prefix}.experts.down_proj"]
        assert gate_up.shape == (4, 2 * inter, hidden) and down.shape == (4, hidden, inter)
        for expert in range(4):
            assert torch.equal(gate_up[expert, :inter], dense[f"{prefix}.gate_proj.weight"])
            assert torch.equal(gate_up[expert, inter:], dense[f"{prefix}.up_proj.weight"])
            assert torch.equal(down[expert], dense[f"{prefix}.down_proj.weight"])
        assert not any(key.startswith(f"{prefix}.gate_proj") for key in moe)
    shared = [key for key in dense if ".mlp." not in key]
    assert all(torch.equal(moe[key], dense[key]) for key in shared)
    assert (moe_dir / "tokenizer.json").is_file() and (moe_dir / "generation_config.json").is_file()


def test_save_load_round_trip_is_bit_exact(moe_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(moe_dirs["qwen2", "all"])
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    on_disk = load_file(moe_dirs["qwen2", "all"] / "model.safetensors")
    resaved = load_file(tmp_path / "again" / "model.safetensors")
    assert on_disk.keys() == resaved.keys()
    assert all(torch.equal(on_disk[key], resaved[key]) for key in on_disk)
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "again"), pdmoe.MoEConfig)


def test_upcycle_is_deterministic_and_converts_dtype(dense_dirs, tmp_path):
    first = upcycle(dense_dirs["llama"], tmp_path / "a", seed=3, dtype=torch.bfloat16, shard_size="40KB")
    second = upcycle(dense_dirs["llama"], tmp_path / "b", seed=3, dtype=torch.bfloat16, shard_size="40KB")
    shards = sorted(path.name for path in first.glob("*.safetensors"))
    assert len(shards) > 1 and (first / "model.safetensors.index.json").is_file()
    for name in shards:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(first)
    assert all(param.dtype == torch.bfloat16 for param in model.parameters())
    index = json.loads((first / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in model.state_dict().values()
    )


def test_router_init_std_and_seed(dense_dirs, tmp_path):
    out = upcycle(dense_dirs["llama"], tmp_path / "std", router_init_std=0.5, seed=7)
    router = load_file(out / "model.safetensors")["model.layers.0.mlp.gate.weight"]
    assert 0.4 < router.std().item() < 0.6
    other = upcycle(dense_dirs["llama"], tmp_path / "seed", router_init_std=0.5, seed=8)
    assert not torch.equal(router, load_file(other / "model.safetensors")["model.layers.0.mlp.gate.weight"])


def test_experts_impl_can_be_chosen_at_load_time(moe_dirs):
    model = AutoModelForCausalLM.from_pretrained(moe_dirs["llama", "all"], experts_impl="torch")
    assert model.config.experts_impl == "torch"
    assert all(block.experts.impl == "torch" for _, block in model.moe_blocks())
