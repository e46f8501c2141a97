"""`pdmoe export`: native Mixtral / Qwen2-MoE / Qwen3-MoE checkpoints that stock transformers loads
without pdmoe, computing the very logits pdmoe computes (float32), in both expert layouts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdmoe import MoEForCausalLM
from pdmoe.cli import main
from pdmoe.export import export
from pdmoe.tiny import build_tiny_dense, perturb_checkpoint
from pdmoe.upcycle import upcycle

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# name: (family, dense overrides, --layers, expected native model_type)
CASES = {
    "llama-all": ("llama", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}, "all", "mixtral"),
    "mistral-all": ("mistral", {"sliding_window": 8}, "all", "mixtral"),
    "qwen3-partial": ("qwen3", {}, "0,2", "qwen3_moe"),
    "qwen2-all": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
        "all",
        "qwen2_moe",
    ),
    "llama-partial": ("llama", {}, "1", "qwen2_moe"),
}
TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))

_NATIVE_LOADER = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    tokens = torch.tensor(json.loads(sys.argv[1]))
    logits, report = {}, {}
    for folder in sys.argv[2:]:
        for impl in ("eager", "default"):
            options = {"experts_implementation": impl} if impl == "eager" else {}
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, output_loading_info=True, **options
            )
            with torch.no_grad():
                logits[f"{folder}:{impl}"] = model.eval()(tokens).logits.contiguous()
        report[folder] = {"class": type(model).__name__, **{k: sorted(map(str, v)) for k, v in info.items()}}
    save_file(logits, sys.argv[2] + ".logits.safetensors")
    assert not any(name.split(".")[0] == "pdmoe" for name in sys.modules), "pdmoe was imported"
    print(json.dumps(report))
    """
)


def _diversify(moe: Path, seed: int, *, like_cpt: bool = False) -> None:
    """Give every expert and router its own values, so the export's routing is really exercised;
    ``like_cpt`` keeps expert 0 as pdmoe's CPT does (the graft checks that it is BASE's FFN)."""
    path = moe / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if ".mlp.gate." in name or ".experts." in name:
            noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.05
            if like_cpt and ".experts." in name:
                noise[0] = 0
            tensors[name] = tensor + noise
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def moes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-in")
    made = {}
    for seed, (name, (family, overrides, layers, _)) in enumerate(CASES.items()):
        dense = build_tiny_dense(root / f"{name}-dense", family, seed=seed, **overrides)
        made[name] = upcycle(dense, root / name, layers=layers)
        _diversify(made[name], seed)
    return made


@pytest.fixture(scope="module")
def native_runs(moes, tmp_path_factory) -> dict:
    """Every case exported in both layouts, plus a graft --export, loaded by a process without pdmoe."""
    root = tmp_path_factory.mktemp("export-out")
    folders = {}
    for name, moe in moes.items():
        for layout in ("per-expert", "fused"):
            folders[name, layout] = export(moe, root / f"{name}-{layout}", layout=layout).out_dir
    base = build_tiny_dense(root / "graft-base", "llama", seed=10)
    instruct = perturb_checkpoint(base, root / "graft-instruct", scale=0.02, seed=11)
    cpt = upcycle(base, root / "graft-cpt", layers="0,2")
    _diversify(cpt, 12, like_cpt=True)
    graft_args = [
        "--base",
        str(base),
        "--instruct",
        str(instruct),
        "--cpt",
        str(cpt),
        "--out",
        str(root / "final"),
    ]
    assert main(["graft", *graft_args, "--export", "auto"]) == 0
    folders["graft", "per-expert"] = root / "final-native"
    listing = [str(folder) for folder in folders.values()]
    child = subprocess.run(
        [sys.executable, "-c", _NATIVE_LOADER, json.dumps(TOKENS.tolist()), *listing],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    logits = load_file(listing[0] + ".logits.safetensors")
    moes = {**moes, "graft": root / "final"}
    return {
        key: (moes[key[0]], report[str(folder)], logits[f"{folder}:eager"], logits[f"{folder}:default"])
        for key, folder in folders.items()
    }


NATIVE_CLASSES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
RUNS = [(case, layout) for case in CASES for layout in ("per-expert", "fused")] + [("graft", "per-expert")]


@pytest.mark.parametrize(("case", "layout"), RUNS)
def test_native_logits_equal_pdmoe_logits(native_runs, case, layout) -> None:
    """Same weights, same routing, same function. Mostly bit-identical; an expert's matrix products
    may round differently in the last bit when its rows come in another order (transformers' eager
    loop takes a token's first choices first, pdmoe's reference token by token), and transformers'
    default grouped experts also sum in another order."""
    moe, report, eager, default = native_runs[case, layout]
    native_type = CASES[case][3] if case in CASES else "qwen2_moe"  # the graft's CPT is a partial-MoE Llama
    assert report["class"] == NATIVE_CLASSES[native_type]
    assert report["missing_keys"] == report["unexpected_keys"] == report["mismatched_keys"] == []
    model = MoEForCausalLM.from_pretrained(moe, dtype=torch.float32, experts_impl="torch").eval()
    with torch.no_grad():
        ours = model(TOKENS).logits
    torch.testing.assert_close(eager, ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(default, ours, rtol=0, atol=1e-6)


def test_fused_layout_links_the_input_shards(moes, tmp_path) -> None:
    out = export(moes["llama-all"], tmp_path / "fused", layout="fused").out_dir
    assert (out / "model.safetensors").stat().st_ino == (
        moes["llama-all"] / "model.safetensors"
    ).stat().st_ino
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    assert (out / "tokenizer.json").is_file()


def test_per_expert_layout_is_the_fused_bytes_renamed(moes, tmp_path) -> None:
    out = export(moes["llama-all"], tmp_path / "hub").out_dir
    native, fused = load_file(out / "model.safetensors"), load_file(moes["llama-all"] / "model.safetensors")
    assert not any("gate_up_proj" in name or ".mlp." in name for name in native)
    layer = "model.layers.2"
    gate_up, down = fused[f"{layer}.mlp.experts.gate_up_proj"], fused[f"{layer}.mlp.experts.down_proj"]
    width = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        assert torch.equal(native[f"{layer}.block_sparse_moe.experts.{e}.w1.weight"], gate_up[e, :width])
        assert torch.equal(native[f"{layer}.block_sparse_moe.experts.{e}.w3.weight"], gate_up[e, width:])
        assert torch.equal(native[f"{layer}.block_sparse_moe.experts.{e}.w2.weight"], down[e])
    assert torch.equal(native[f"{layer}.block_sparse_moe.gate.weight"], fused[f"{layer}.mlp.gate.weight"])


def test_a_sharded_input_stays_sharded(moes, tmp_path) -> None:
    moe = upcycle(
        moes["qwen3-partial"].parent / "qwen3-partial-dense",
        tmp_path / "sharded",
        layers="0,2",
        shard_size="200KB",
    )
    out = export(moe, tmp_path / "out").out_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(path.name for path in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == shards and len(shards) > 1
    assert sum(len(load_file(out / shard)) for shard in shards) == len(index["weight_map"])


@pytest.mark.parametrize(
    ("case", "options", "reason"),
    [
        ("llama-partial", ["--format", "mixtral"], "Mixtral has no dense layers"),
        ("qwen2-all", ["--format", "mixtral"], "no exact mixtral form"),
        ("qwen3-partial", ["--format", "qwen2_moe"], "q/k norms exist only in Qwen3-MoE"),
    ],
)
def test_models_without_an_exact_target_are_refused(moes, tmp_path, capsys, case, options, reason) -> None:
    code = main(["export", "--model", str(moes[case]), "--out", str(tmp_path / "out"), *options])
    err = capsys.readouterr().err
    assert code == 2 and reason in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_attention_biases_of_llama_have_no_target(tmp_path, capsys) -> None:
    dense = build_tiny_dense(tmp_path / "dense", "llama", attention_bias=True)
    moe = upcycle(dense, tmp_path / "moe")
    assert main(["export", "--model", str(moe), "--out", str(tmp_path / "out")]) == 2
    assert "attention biases" in capsys.readouterr().err


def test_graft_checks_the_export_before_grafting(moes, tmp_path, capsys) -> None:
    dense = moes["llama-partial"].parent / "llama-partial-dense"
    args = ["--base", str(dense), "--instruct", str(dense), "--cpt", str(moes["llama-partial"])]
    code = main(["graft", *args, "--out", str(tmp_path / "final"), "--export", "mixtral"])
    assert code == 2 and "Mixtral has no dense layers" in capsys.readouterr().err
    assert not (tmp_path / "final").exists()
