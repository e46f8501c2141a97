"""vLLM loads pdmoe's exports as the very model: a static check against vLLM's own model sources.

vLLM needs a GPU, so it is not run here: its wheel is downloaded (``pip download --no-deps vllm``,
never installed) and its model files for Mixtral, Qwen2-MoE and Qwen3-MoE are read from the zip.
For every per-expert export of tests/export_cases.py (experts and routers perturbed, so experts
differ) the check builds the parameters vLLM's model class builds for that config.json (tensor
parallel 1), maps every exported tensor through vLLM's own checkpoint-name mappers (read from the
source with ``ast``), and requires: every tensor lands on a parameter shard of its shape, every
shard gets exactly one tensor, and every config field the model class reads means what pdmoe
computes (renormalised top-k, head size, biases, dense layers, a shared expert that adds 0).
Where ``pdmoe export`` says vLLM is not exact, the check expects the problem it names.

Each fact taken from vLLM's source is found in the wheel by pattern; if vLLM changes the code,
the pattern is not found and the check fails instead of passing on stale facts.

    python bench/clients/vllm_static.py [--wheel VLLM.whl | --cache DIR]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pdmoe.config import MoEConfig
from pdmoe.export import export
from pdmoe.export.formats import ServingStack
from tests.export_cases import CASES, build_cases

DEFAULT_CACHE = Path(os.environ.get("PDMOE_VLLM_CACHE", "~/.cache/pdmoe/vllm")).expanduser()
MODELS = "vllm/model_executor/models/"
SOURCES = {"mixtral": "mixtral.py", "qwen2_moe": "qwen2_moe.py", "qwen3_moe": "qwen3_moe.py"}
FUSED_MOE_LAYER = "vllm/model_executor/layers/fused_moe/layer.py"


class SourceChanged(Exception):
    pass


def find(source: str, pattern: str, what: str) -> re.Match:
    match = re.search(pattern, source, re.S)
    if match is None:
        raise SourceChanged(f"vLLM's source no longer has {what} (pattern {pattern!r})")
    return match


def weights_mapper(source: str, owner: str) -> dict[str, dict]:
    """The ``WeightsMapper(...)`` keyword dicts of class ``owner`` (or the one it copies)."""
    tree = ast.parse(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for statement in classes[owner].body:
        if isinstance(statement, ast.Assign) and statement.targets[0].id == "hf_to_vllm_mapper":
            value = statement.value
            if isinstance(value, ast.Attribute):  # ``OtherClass.hf_to_vllm_mapper``
                return weights_mapper(source, value.value.id)
            return {keyword.arg: ast.literal_eval(keyword.value) for keyword in value.keywords}
    raise SourceChanged(f"{owner} has no hf_to_vllm_mapper")


@dataclass(frozen=True)
class VllmModel:
    """What vLLM's model class for one architecture does with a config, as its source says."""

    mapper: dict[str, dict]
    moe_module: str  # attribute of a decoder layer holding the MoE block
    expert_names: tuple[str, str, str]  # checkpoint names of gate, down, up
    renormalize: str  # "True" or the config field it reads
    head_dim_from_config: bool
    qkv_bias: str  # "True", "False" or the config field it reads
    qk_norm: bool
    shared_expert_gate_always: bool  # built even when the shared expert is not
    reads_shared_expert: bool


def read_vllm(wheel: Path) -> dict[str, VllmModel]:
    with zipfile.ZipFile(wheel) as archive:
        text = {arch: archive.read(MODELS + name).decode() for arch, name in SOURCES.items()}
        layer = archive.read(FUSED_MOE_LAYER).decode()
    default_names = ast.literal_eval(
        find(
            layer, r"ckpt_names: tuple\[str, str, str \| None\] = (\([^)]*\))", "FusedMoE's ckpt_names"
        ).group(1)
    )
    mixtral, qwen2, qwen3 = text["mixtral"], text["qwen2_moe"], text["qwen3_moe"]
    find(qwen2, r"self\.mlp = Qwen2MoeSparseMoeBlock", "Qwen2-MoE's MoE block under .mlp")
    find(qwen3, r"self\.mlp = Qwen3MoeSparseMoeBlock", "Qwen3-MoE's MoE block under .mlp")
    find(mixtral, r"self\.block_sparse_moe = MixtralMoE", "Mixtral's MoE block under .block_sparse_moe")
    for source, arch in ((qwen2, "Qwen2-MoE"), (qwen3, "Qwen3-MoE")):
        find(source, r"layer_idx not in mlp_only_layers", f"{arch}'s mlp_only_layers")
        find(
            source, r"\(layer_idx \+ 1\) % config\.decoder_sparse_step == 0", f"{arch}'s decoder_sparse_step"
        )
    find(
        qwen2, r"self\.head_dim = hidden_size // self\.total_num_heads", "Qwen2-MoE's head size hidden/heads"
    )
    find(mixtral, r'self\.head_dim = getattr\(config, "head_dim", None\)', "Mixtral's head_dim")
    find(qwen3, r'head_dim=getattr\(config, "head_dim", None\)', "Qwen3-MoE's head_dim")
    find(qwen2, r"if config\.shared_expert_intermediate_size > 0:", "Qwen2-MoE's shared expert condition")
    find(
        qwen2, r"self\.shared_expert_gate = ReplicatedLinear\(\s*config\.hidden_size,\s*1,", "its gate [1, H]"
    )
    find(qwen3, r'qkv_bias=getattr\(config, "attention_bias", False\)', "Qwen3-MoE's attention_bias")
    find(qwen3, r'ignore_unexpected_suffixes=\[\s*"\.bias"', "Qwen3-MoE dropping unexpected biases")

    def renormalize(source: str, arch: str) -> str:
        return find(source, r"renormalize=(True|config\.norm_topk_prob)", f"{arch}'s renormalize").group(1)

    def qkv_bias(source: str, arch: str) -> str:
        return find(
            source, r"QKVParallelLinear\((?:[^()]|\([^()]*\))*?bias=([\w.]+)", f"{arch}'s qkv bias"
        ).group(1)

    mixtral_names = ast.literal_eval(
        find(mixtral, r"ckpt_names=(\([^)]*\))", "Mixtral's ckpt_names").group(1)
    )
    return {
        "mixtral": VllmModel(
            weights_mapper(mixtral, "MixtralForCausalLM"),
            "block_sparse_moe",
            mixtral_names,
            renormalize(mixtral, "Mixtral"),
            True,
            qkv_bias(mixtral, "Mixtral"),
            False,
            False,
            False,
        ),
        "qwen2_moe": VllmModel(
            weights_mapper(qwen2, "Qwen2MoeForCausalLM"),
            "mlp",
            default_names,
            renormalize(qwen2, "Qwen2-MoE"),
            False,
            qkv_bias(qwen2, "Qwen2-MoE"),
            False,
            True,
            True,
        ),
        "qwen3_moe": VllmModel(
            weights_mapper(qwen3, "Qwen3MoeForCausalLM"),
            "mlp",
            default_names,
            renormalize(qwen3, "Qwen3-MoE"),
            True,
            qkv_bias(qwen3, "Qwen3-MoE"),
            bool(re.search(r"self\.q_norm = RMSNorm", qwen3)),
            False,
            True,
        ),
    }


def flag(value: str, config: dict[str, Any]) -> bool:
    """A source expression ("True", "config.norm_topk_prob", "qkv_bias") evaluated on ``config``."""
    if value in ("True", "False"):
        return value == "True"
    return bool(config.get({"qkv_bias": "attention_bias"}.get(value, value.removeprefix("config."))))


def vllm_parameters(model: VllmModel, config: dict[str, Any]) -> dict[tuple[str, Any], tuple[int, ...]]:
    """(parameter, shard) -> shape of every parameter vLLM builds for ``config`` (tensor parallel 1)."""
    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head = (config.get("head_dim") if model.head_dim_from_config else None) or hidden // heads
    experts = config.get("num_local_experts", config.get("num_experts"))
    width = config.get("moe_intermediate_size", config["intermediate_size"])
    params: dict[tuple[str, Any], tuple[int, ...]] = {
        ("model.embed_tokens.weight", None): (config["vocab_size"], hidden),
        ("model.norm.weight", None): (hidden,),
    }
    if not config.get("tie_word_embeddings"):
        params["lm_head.weight", None] = (config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        params[f"{layer}.input_layernorm.weight", None] = (hidden,)
        params[f"{layer}.post_attention_layernorm.weight", None] = (hidden,)
        sizes = {"q": heads * head, "k": kv * head, "v": kv * head}
        for shard, rows in sizes.items():
            params[f"{layer}.self_attn.qkv_proj.weight", shard] = (rows, hidden)
            if flag(model.qkv_bias, config):
                params[f"{layer}.self_attn.qkv_proj.bias", shard] = (rows,)
        params[f"{layer}.self_attn.o_proj.weight", None] = (hidden, heads * head)
        if model.qk_norm:
            params[f"{layer}.self_attn.q_norm.weight", None] = (head,)
            params[f"{layer}.self_attn.k_norm.weight", None] = (head,)
        sparse = (
            i not in config.get("mlp_only_layers", []) and (i + 1) % config.get("decoder_sparse_step", 1) == 0
        )
        if not sparse:
            for shard in (0, 1):
                params[f"{layer}.mlp.gate_up_proj.weight", shard] = (config["intermediate_size"], hidden)
            params[f"{layer}.mlp.down_proj.weight", None] = (hidden, config["intermediate_size"])
            continue
        moe = f"{layer}.{model.moe_module}"
        params[f"{moe}.gate.weight", None] = (experts, hidden)
        for e in range(experts):
            params[f"{moe}.experts.w13_weight", (e, "w1")] = (width, hidden)
            params[f"{moe}.experts.w13_weight", (e, "w3")] = (width, hidden)
            params[f"{moe}.experts.w2_weight", (e, "w2")] = (hidden, width)
        shared = config.get("shared_expert_intermediate_size", 0) if model.reads_shared_expert else 0
        if model.shared_expert_gate_always or shared > 0:
            params[f"{moe}.shared_expert_gate.weight", None] = (1, hidden)
        if shared > 0:
            for shard in (0, 1):
                params[f"{moe}.shared_expert.gate_up_proj.weight", shard] = (shared, hidden)
            params[f"{moe}.shared_expert.down_proj.weight", None] = (hidden, shared)
    return params


_EXPERT = re.compile(r"^(?P<moe>.+)\.experts\.(?P<e>\d+)\.(?P<name>\w+)\.weight$")


def vllm_name(model: VllmModel, name: str) -> tuple[str, Any]:
    """The (parameter, shard) vLLM's loader puts checkpoint tensor ``name`` into."""
    for old, new in model.mapper.get("orig_to_new_substr", {}).items():
        name = name.replace(old, new)
    if match := _EXPERT.match(name):
        gate, down, up = model.expert_names
        shard = {gate: "w1", down: "w2", up: "w3"}.get(match["name"])
        if shard is not None:
            return f"{match['moe']}.experts.{'w2' if shard == 'w2' else 'w13'}_weight", (
                int(match["e"]),
                shard,
            )
    for old, (new, shard) in model.mapper.get("orig_to_new_stacked", {}).items():
        if old in name:
            return name.replace(old, new), shard
    return name, None


def check_export(model: VllmModel, folder: Path, moe: Path) -> list[str]:
    """Every problem vLLM would have with the export in ``folder`` of the pdmoe MoE ``moe``."""
    config = json.loads((folder / "config.json").read_text())
    ours = MoEConfig.from_pretrained(moe, trust_remote_code=False)
    problems: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(shard)
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    built = vllm_parameters(model, config)
    covered: dict[tuple[str, Any], str] = {}
    for name, shape in shapes.items():
        target = vllm_name(model, name)
        if target not in built:
            problems.append(f"{name} maps to {target}, which vLLM does not build")
        elif built[target] != shape:
            problems.append(f"{name} is {list(shape)}, vLLM's {target} is {list(built[target])}")
        elif target in covered:
            problems.append(f"{name} and {covered[target]} both load {target}")
        covered[target] = name
    problems += [f"vLLM builds {target}, no tensor loads it" for target in built if target not in covered]
    # The config fields vLLM's model class reads, against what pdmoe computes.
    if flag(model.renormalize, config) != ours.norm_topk_prob:
        problems.append(
            f"vLLM renormalises top-k: {flag(model.renormalize, config)}, pdmoe: {ours.norm_topk_prob}"
        )
    head = (config.get("head_dim") if model.head_dim_from_config else None) or config[
        "hidden_size"
    ] // config["num_attention_heads"]
    our_head = getattr(ours, "head_dim", None) or ours.hidden_size // ours.num_attention_heads
    if head != our_head:
        problems.append(f"vLLM's head size is {head}, pdmoe's {our_head}")
    dense = sorted(set(range(ours.num_hidden_layers)) - set(ours.moe_layers))
    vllm_dense = sorted(
        {int(name.split(".")[2]) for name, _ in built if name.endswith(".mlp.down_proj.weight")}
    )
    if vllm_dense != dense:
        problems.append(f"vLLM's dense layers are {vllm_dense}, pdmoe's {dense}")
    for field in ("num_experts_per_tok", "rms_norm_eps", "vocab_size", "rope_parameters", "hidden_act"):
        if config.get(field) != getattr(ours, field):
            problems.append(f"config {field} is {config.get(field)!r}, pdmoe's {getattr(ours, field)!r}")
    shared = {name: tensor for name, tensor in tensors.items() if "shared_expert" in name}
    if any(tensor.any() for name, tensor in shared.items() if ".shared_expert." in name):
        problems.append("a shared expert has nonzero weights: it would add to the MoE output")
    if not all(torch.isfinite(tensor).all() for tensor in shared.values()):
        problems.append("a shared-expert tensor is not finite")
    return problems


def wheel_path(args: argparse.Namespace) -> Path:
    if args.wheel:
        return args.wheel
    found = sorted(args.cache.glob("vllm-*.whl"))
    if not found:
        args.cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "vllm", "-d", str(args.cache)], check=True
        )
        found = sorted(args.cache.glob("vllm-*.whl"))
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="a downloaded vllm wheel")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheel is kept")
    args = parser.parse_args(argv)
    wheel = wheel_path(args)
    models = read_vllm(wheel)
    print(f"vLLM model sources from {wheel.name}")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        moes = build_cases(Path(tmp) / "in")
        for name, moe in moes.items():
            report = export(moe, Path(tmp) / "out" / name)
            problems = check_export(models[report.format.value], report.out_dir, moe)
            native = json.loads((report.out_dir / "config.json").read_text())
            window = native.get("sliding_window") is not None and native.get("use_sliding_window", True)
            note = " (sliding window: applied outside the model file, not checked)" if window else ""
            verdict = (
                "every tensor, shape and config field matches"
                if not problems
                else f"{len(problems)} problem(s)"
            )
            caveat = report.not_exact_in.get(ServingStack.VLLM)
            said = f"export says not exact ({caveat})" if caveat else "export says exact"
            print(f"{name:24} {CASES[name].layers:4} -> {report.format.value:10} {said}: {verdict}{note}")
            for problem in problems:
                print(f"    {problem}")
            if bool(problems) != bool(caveat):
                print("    MISMATCH: pdmoe export's claim does not hold")
                failed += 1
    print(f"{len(moes) - failed} of {len(moes)} exports behave in vLLM's model classes as pdmoe export says")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
