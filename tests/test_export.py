"""`pdmoe export`: native Mixtral / Qwen2-MoE / Qwen3-MoE checkpoints that stock transformers loads
without pdmoe, computing the very logits pdmoe computes (float32), in both expert layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdmoe import MoEForCausalLM
from pdmoe.cli import main
from pdmoe.config import MoEConfig
from pdmoe.export import export
from pdmoe.export.formats import NativeFormat, ServingStack, stacks_not_exact
from pdmoe.tiny import build_tiny_dense, perturb_checkpoint
from pdmoe.upcycle import upcycle
from tests.export_cases import CASES, build_cases, diversify

TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
# Keys transformers 4.x reads and 5 does not need (5 reads rope_parameters): dropped, 5 must compute
# bit for bit the same.
TRANSFORMERS_4_KEYS = ("rope_theta", "rope_scaling")
TRANSFORMERS_4_ENV = "PDMOE_TRANSFORMERS4_PYTHON"

_NATIVE_LOADER = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    tokens, v4_keys, folders = torch.tensor(json.loads(sys.argv[1])), json.loads(sys.argv[2]), sys.argv[3:]
    logits, report = {}, {}
    for folder in folders:
        with open(f"{folder}/config.json") as handle:
            stripped = {k: v for k, v in json.load(handle).items() if k not in v4_keys}
        options = {
            "eager": {"experts_implementation": "eager"},
            "default": {},
            "v5-keys-only": {"config": AutoConfig.for_model(**stripped)},
        }
        for impl, extra in options.items():
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, output_loading_info=True, **extra
            )
            with torch.no_grad():
                logits[f"{folder}:{impl}"] = model.eval()(tokens).logits.contiguous()
        report[folder] = {"class": type(model).__name__, **{k: sorted(map(str, v)) for k, v in info.items()}}
    save_file(logits, folders[0] + ".logits.safetensors")
    assert not any(name.split(".")[0] == "pdmoe" for name in sys.modules), "pdmoe was imported"
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def moes(tmp_path_factory) -> dict[str, Path]:
    return build_cases(tmp_path_factory.mktemp("export-in"))


@dataclass(frozen=True)
class NativeRun:
    """One export as a process with transformers 5 and without pdmoe loaded it."""

    moe: Path
    folder: Path
    report: dict
    eager: torch.Tensor
    default: torch.Tensor
    v5_keys_only: torch.Tensor  # the config without the keys only transformers 4.x reads
    not_exact_in: dict[ServingStack, str]  # what export said


@pytest.fixture(scope="module")
def native_runs(moes, tmp_path_factory) -> dict:
    """Every case exported in both layouts, plus a graft --export, loaded by a process without pdmoe."""
    root = tmp_path_factory.mktemp("export-out")
    folders, caveats = {}, {}
    for name, moe in moes.items():
        for layout in ("per-expert", "fused"):
            report = export(moe, root / f"{name}-{layout}", layout=layout)
            folders[name, layout], caveats[name, layout] = report.out_dir, report.not_exact_in
    base = build_tiny_dense(root / "graft-base", "llama", seed=10)
    instruct = perturb_checkpoint(base, root / "graft-instruct", scale=0.02, seed=11)
    cpt = upcycle(base, root / "graft-cpt", layers="0,2")
    diversify(cpt, 12, like_cpt=True)
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
    graft_config = MoEConfig.from_pretrained(root / "final").to_dict()
    caveats["graft", "per-expert"] = stacks_not_exact(graft_config, NativeFormat.QWEN2_MOE)
    listing = [str(folder) for folder in folders.values()]
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _NATIVE_LOADER,
            json.dumps(TOKENS.tolist()),
            json.dumps(TRANSFORMERS_4_KEYS),
            *listing,
        ],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    logits = load_file(listing[0] + ".logits.safetensors")
    moes = {**moes, "graft": root / "final"}
    return {
        key: NativeRun(
            moes[key[0]],
            folder,
            report[str(folder)],
            logits[f"{folder}:eager"],
            logits[f"{folder}:default"],
            logits[f"{folder}:v5-keys-only"],
            caveats[key],
        )
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
    run = native_runs[case, layout]
    native_type = CASES[case].native_type if case in CASES else "qwen2_moe"  # the graft's CPT: partial Llama
    assert run.report["class"] == NATIVE_CLASSES[native_type]
    assert run.report["missing_keys"] == run.report["unexpected_keys"] == run.report["mismatched_keys"] == []
    model = MoEForCausalLM.from_pretrained(run.moe, dtype=torch.float32, experts_impl="torch").eval()
    with torch.no_grad():
        ours = model(TOKENS).logits
    torch.testing.assert_close(run.eager, ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(run.default, ours, rtol=0, atol=1e-6)
    # What transformers 4.x needs in config.json changes nothing in transformers 5, to the bit.
    assert torch.equal(run.default, run.v5_keys_only)


def _transformers_4_python() -> str | None:
    """The side environment's python (see bench/clients/transformers4.py); CI must have it."""
    python = os.environ.get(TRANSFORMERS_4_ENV)
    if python and Path(python).is_file():
        return python
    if os.environ.get("CI") == "true":
        pytest.fail(
            f"CI runs this check: {TRANSFORMERS_4_ENV} must name the transformers 4.x python (.ci/run)"
        )
    return None


def test_transformers_4_logits_equal_transformers_5(native_runs, tmp_path) -> None:
    """Every per-expert export, loaded by transformers 4.x in its own environment (one process, no
    pdmoe), computes transformers 5's float32 logits: RoPE, scaling, windows and biases read alike;
    where export says 4.x is not exact, it is indeed not."""
    python = _transformers_4_python()
    if python is None:
        pytest.skip(
            f"set {TRANSFORMERS_4_ENV} to a transformers 4.x python: bench/clients/transformers4.py create"
        )
    runs = {key: run for key, run in native_runs.items() if key[1] == "per-expert"}
    (tmp_path / "tokens.json").write_text(json.dumps(TOKENS.tolist()))
    script = Path(__file__).parents[1] / "bench" / "clients" / "transformers4.py"
    folders = [str(run.folder) for run in runs.values()]
    out = tmp_path / "logits.safetensors"
    child = subprocess.run(
        [python, str(script), "logits", str(out), str(tmp_path / "tokens.json"), *folders],
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["transformers"] < "5"
    logits = load_file(out)
    for (case, _), run in runs.items():
        loaded = report[str(run.folder)]
        assert loaded["class"] == run.report["class"], case
        assert loaded["missing_keys"] == loaded["unexpected_keys"] == loaded["mismatched_keys"] == [], case
        if ServingStack.TRANSFORMERS_4 in run.not_exact_in:
            assert (logits[str(run.folder)] - run.default).abs().max() > 1e-2, case
        else:
            torch.testing.assert_close(logits[str(run.folder)], run.default, rtol=0, atol=1e-5, msg=case)
    assert any(ServingStack.TRANSFORMERS_4 in run.not_exact_in for run in runs.values())


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


def test_qwen2_moe_shared_expert_adds_exactly_zero_and_biases_are_explicit(native_runs) -> None:
    """No zero-width tensor (llama.cpp and vLLM read width 0 as "no shared expert"), no all-zero gate
    (llama.cpp's sigmoid is silu(x)/x: NaN at 0), zero MLP weights; a Llama source gets zero q/k/v
    biases, which every Qwen2-MoE but transformers 5's always builds."""
    folder = native_runs["llama-partial", "per-expert"].folder
    config = json.loads((folder / "config.json").read_text())
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors |= load_file(shard)
    width = config["shared_expert_intermediate_size"]
    assert width > 0 and config["qkv_bias"] is True
    assert config["mlp_only_layers"] == [0, 2]
    mlp = "model.layers.1.mlp"
    for projection in ("gate_proj", "up_proj"):
        assert tensors[f"{mlp}.shared_expert.{projection}.weight"].shape == (width, config["hidden_size"])
        assert not tensors[f"{mlp}.shared_expert.{projection}.weight"].any()
    assert not tensors[f"{mlp}.shared_expert.down_proj.weight"].any()
    assert torch.equal(tensors[f"{mlp}.shared_expert_gate.weight"], torch.ones(1, config["hidden_size"]))
    assert not any(name.startswith("model.layers.0.mlp.shared") for name in tensors)  # a dense layer
    for layer in range(config["num_hidden_layers"]):
        for projection in ("q_proj", "k_proj", "v_proj"):
            bias = tensors[f"model.layers.{layer}.self_attn.{projection}.bias"]
            assert not bias.any() and bias.shape == (
                tensors[f"model.layers.{layer}.self_attn.{projection}.weight"].shape[0],
            )


@pytest.mark.parametrize(
    ("case", "target", "caveat"),
    [
        ("llama-all", "mixtral", None),
        ("qwen3-all", "qwen3_moe", None),
        ("mistral-all", "mixtral", "llama.cpp: it applies no sliding window (this model's: 8 tokens)"),
        ("qwen3-partial", "qwen3_moe", "llama.cpp: its Qwen MoEs have no dense FFN layers"),
        ("qwen3-attention-bias", "qwen3_moe", "vLLM: its Qwen3-MoE has no o_proj bias"),
        ("qwen2-all", "qwen2_moe", "llama.cpp: its Qwen2-MoE never renormalises the top-k routing weights"),
        ("qwen2-all-unnormalised", "qwen2_moe", None),
        ("llama-all-unnormalised", "qwen2_moe", None),
    ],
)
def test_auto_takes_the_target_the_most_stacks_run_exactly_and_says_where_not(
    moes, tmp_path, capsys, case, target, caveat
) -> None:
    assert main(["export", "--model", str(moes[case]), "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == target
    assert ("not exact in" in said) == (caveat is not None) and (caveat is None or caveat in said), said


@pytest.mark.parametrize(
    ("case", "format", "reason", "instead"),
    [
        ("llama-all-unnormalised", "mixtral", "Mixtral always renormalises", "use --format qwen2_moe"),
        ("llama-partial", "qwen3_moe", "no exact qwen3_moe form", "use --format qwen2_moe"),
        ("qwen2-all", "qwen3_moe", "q/k/v biases exist only in Qwen2-MoE", "use --format qwen2_moe"),
    ],
)
def test_a_format_that_is_not_exact_names_one_that_is(
    moes, tmp_path, capsys, case, format, reason, instead
) -> None:
    code = main(["export", "--model", str(moes[case]), "--out", str(tmp_path / "out"), "--format", format])
    err = capsys.readouterr().err
    assert code == 2 and reason in err and instead in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("layers", "refused"), [("1", True), ("all", False)])
def test_a_head_dim_other_than_hidden_over_heads_has_no_qwen2_moe_form(
    tmp_path, capsys, layers, refused
) -> None:
    """vLLM's and llama.cpp's Qwen2-MoE compute the head size as hidden/heads; Mixtral reads head_dim."""
    dense = build_tiny_dense(tmp_path / "dense", "llama", head_dim=8)
    moe = upcycle(dense, tmp_path / "moe", layers=layers)
    code = main(["export", "--model", str(moe), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    if refused:
        assert code == 2 and "head_dim is 8" in err and "hidden_size / num_attention_heads (16)" in err, err
        assert not (tmp_path / "out").exists()
    else:
        assert code == 0 and json.loads((tmp_path / "out" / "config.json").read_text())["head_dim"] == 8


def _edit(moe: Path, out: Path, *, config: dict | None = None, tensor: tuple | None = None) -> Path:
    """A copy of ``moe`` with config fields replaced or one tensor replaced (name, new value)."""
    out.mkdir()
    for path in moe.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    if config:
        settings = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(settings | config))
    if tensor:
        tensors = load_file(out / "model.safetensors")
        tensors[tensor[0]] = tensor[1](tensors[tensor[0]])
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            {"config": {"num_experts": 8}},
            "model.layers.1.mlp.gate.weight is [4, 64], the config implies [8, 64]",
        ),
        ({"config": {"num_experts": "4"}}, "num_experts is '4', not a positive integer"),
        ({"config": {"num_experts_per_tok": 2.0}}, "num_experts_per_tok is 2.0, not a positive integer"),
        ({"config": {"moe_layers": [0, 1]}}, "moe_layers is [0, 1], but the tensors have MoE layers [1]"),
        (
            {"tensor": ("model.layers.1.mlp.experts.gate_up_proj", lambda t: t[:, :-1].contiguous())},
            "gate_up_proj is [4, 191, 64], the config implies [4, 192, 64]",
        ),
    ],
)
def test_export_checks_the_config_against_the_tensors_as_graft_does(
    moes, tmp_path, capsys, edit, reason
) -> None:
    bad = _edit(moes["llama-partial"], tmp_path / "bad", **edit)
    code = main(["export", "--model", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and reason in err and "Traceback" not in err, err
    if "not a positive integer" in reason:  # the cause alone, not the shapes it makes look wrong
        assert "implies" not in err, err
    assert not (tmp_path / "out").exists()
