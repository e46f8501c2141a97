"""Checkpoints for the graft tests, and the independent recomputation the outputs are judged by.

The ``test_graft_*`` modules import these helpers from the ``tests`` package. The reference loads whole state dicts with ``safetensors.torch.load_file`` and
computes in float64, written from docs/method.md, not from the implementation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pdmoe.io.writer import CheckpointWriter, plan_shards

VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def save_checkpoint(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    *,
    shard_bytes: int | None = None,
    tokenizer: dict | None = None,
) -> Path:
    """A checkpoint directory: config, one file or shards + index, optional tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if shard_bytes is None:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(directory / "model.safetensors"),
            {"format": "pt"},
        )
    else:
        from pdmoe.io.safetensors_format import TensorMeta

        metas = [TensorMeta(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
        writer = CheckpointWriter(directory, plan_shards(metas, shard_bytes))
        for index, shard in enumerate(writer.shards):
            with writer.open_shard(index) as shard_writer:
                for meta in shard:
                    shard_writer.write(meta.name, tensors[meta.name])
        writer.finish()
    for name, payload in (tokenizer or {}).items():
        (directory / name).write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return directory


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, loaded whole."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def dense_config(
    layers: int = 2, hidden: int = 8, ffn: int = 12, vocab: int = 20, tied: bool = False
) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }


def dense_tensors(
    layers: int = 2,
    hidden: int = 8,
    ffn: int = 12,
    vocab: int = 20,
    *,
    tied: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Llama-style dense weights with random values."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": rand(hidden)}
    if not tied:
        tensors["lm_head.weight"] = rand(vocab, hidden)
    for i in range(layers):
        prefix = f"model.layers.{i}"
        tensors |= {
            f"{prefix}.input_layernorm.weight": rand(hidden),
            f"{prefix}.self_attn.q_proj.weight": rand(hidden, hidden),
            f"{prefix}.self_attn.o_proj.weight": rand(hidden, hidden),
            f"{prefix}.mlp.gate_proj.weight": rand(ffn, hidden),
            f"{prefix}.mlp.up_proj.weight": rand(ffn, hidden),
            f"{prefix}.mlp.down_proj.weight": rand(hidden, ffn),
        }
    return tensors


def perturb(
    tensors: dict[str, torch.Tensor], *, seed: int, only: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """A copy with N(0, 0.1) noise on every tensor (or only those whose name contains one of ``only``)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in tensors.items():
        if only and not any(part in name for part in only):
            out[name] = tensor.clone()
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * 0.1
        out[name] = (tensor.float() + noise).to(tensor.dtype)
    return out


def synthetic_upcycle(
    dense: dict[str, torch.Tensor], experts: int = 4, layers: tuple[int, ...] = (0, 1)
) -> dict:
    """The MoE layout of docs/method.md made by hand: E copies of each chosen layer's FFN, random routers."""
    out = {}
    for name, tensor in dense.items():
        parts = name.split(".")
        if name.endswith("mlp.gate_proj.weight") and int(parts[2]) in layers:
            mlp = name.removesuffix(".gate_proj.weight")
            gate_up = torch.cat([tensor, dense[f"{mlp}.up_proj.weight"]])
            out[f"{mlp}.gate.weight"] = torch.randn(experts, tensor.shape[1]).to(tensor.dtype)
            out[f"{mlp}.experts.gate_up_proj"] = gate_up.expand(experts, *gate_up.shape).clone()
            down = dense[f"{mlp}.down_proj.weight"]
            out[f"{mlp}.experts.down_proj"] = down.expand(experts, *down.shape).clone()
        elif not (".mlp." in name and len(parts) > 2 and int(parts[2]) in layers):
            out[name] = tensor
    return out


def fake_cpt(moe: dict[str, torch.Tensor], *, seed: int = 7) -> dict[str, torch.Tensor]:
    """CPT as docs/method.md trains it: only experts 1..E-1 and the routers move."""
    out = perturb(moe, seed=seed, only=(".mlp.gate.weight", ".experts."))
    for name, tensor in out.items():
        if ".experts." in name:
            tensor[0] = moe[name][0]
    return out


TOKENIZER = {
    "tokenizer.json": {"model": {"vocab": {"a": 0}}},
    "tokenizer_config.json": {"chat_template": "{{ base }}"},
}


def with_rows(tensors: dict[str, torch.Tensor], vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Embedding / head rows appended up to ``vocab`` (tokens added by this checkpoint)."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for name in VOCAB_KEYS:
        if name in out and vocab > out[name].shape[0]:
            extra = torch.randn(vocab - out[name].shape[0], out[name].shape[1], generator=generator)
            out[name] = torch.cat([out[name], extra.to(out[name].dtype)])
    return out


def make(
    root: Path,
    *,
    dtype=torch.float32,
    tied=False,
    moe=False,
    base_vocab=20,
    instruct_vocab=20,
    cpt_vocab=20,
    shard_bytes=None,
    cpt_trained_shared=False,
) -> tuple[Path, Path, Path]:
    """BASE, INSTRUCT (post-trained: everything moved) and CPT: dense (everything moved), or
    upcycled with the new experts and routers moved (and, ``cpt_trained_shared``, the rest too)."""
    config = dense_config(tied=tied)
    base = dense_tensors(vocab=base_vocab, tied=tied, dtype=dtype)
    instruct = with_rows(perturb(base, seed=1), instruct_vocab, seed=3)
    moved = perturb(base, seed=2) if cpt_trained_shared or not moe else base
    cpt = with_rows(moved, cpt_vocab, seed=4)
    cpt_config = dict(config, vocab_size=cpt_vocab)
    if moe:
        cpt = fake_cpt(synthetic_upcycle(cpt))
        cpt_config |= {
            "model_type": "pdmoe",
            "base_model_type": "llama",
            "moe_layers": [0, 1],
            "num_experts": 4,
        }
    tokenizers = {
        "instruct": {
            **TOKENIZER,
            "tokenizer_config.json": {"chat_template": "{{ instruct }}"},
            "chat_template.jinja": "instruct template",
            "generation_config.json": {"eos": 1},
        },
        "cpt": {**TOKENIZER, "tokenizer.json": {"model": {"vocab": {"a": 0, "new": 20}}}},
    }
    return (
        save_checkpoint(
            root / "base",
            base,
            dict(config, vocab_size=base_vocab),
            shard_bytes=shard_bytes,
            tokenizer=TOKENIZER,
        ),
        save_checkpoint(
            root / "instruct",
            instruct,
            dict(config, vocab_size=instruct_vocab),
            tokenizer=tokenizers["instruct"],
        ),
        save_checkpoint(root / "cpt", cpt, cpt_config, shard_bytes=shard_bytes, tokenizer=tokenizers["cpt"]),
    )


def reference_graft(
    base_dir: Path,
    instruct_dir: Path,
    cpt_dir: Path,
    *,
    scale: float = 1.0,
    skip_embeddings: bool = False,
    dtype: torch.dtype | None = None,
    work: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """The graft of docs/method.md step 4, recomputed from whole state dicts."""
    base, instruct, cpt = load_dir(base_dir), load_dir(instruct_dir), load_dir(cpt_dir)

    def delta(name: str) -> torch.Tensor:
        rows = base[name].shape[0] if base[name].dim() else None
        return instruct[name][:rows].to(work) - base[name].to(work)

    out = {}
    for name, value in cpt.items():
        result = value.to(work).clone()
        if name.endswith(".experts.gate_up_proj"):
            mlp = name.removesuffix(".experts.gate_up_proj")
            result += torch.cat([delta(f"{mlp}.gate_proj.weight"), delta(f"{mlp}.up_proj.weight")]) * scale
        elif name.endswith(".experts.down_proj"):
            result += delta(name.replace(".experts.down_proj", ".down_proj.weight")) * scale
        elif name in base and value.dtype.is_floating_point:
            rows = base[name].shape[0] if value.dim() else None
            if not (skip_embeddings and name in VOCAB_KEYS):
                result[:rows] += delta(name) * scale
            if name in VOCAB_KEYS and instruct[name].shape[0] > rows:
                result = torch.cat([result, instruct[name][rows:].to(work)])
        out[name] = result.to(dtype if dtype is not None and value.dtype.is_floating_point else value.dtype)
    return out


@dataclass
class Pipeline:
    """BASE, INSTRUCT and CPT directories of one test scenario."""

    base: Path
    instruct: Path
    cpt: Path


def real_pipeline(root: Path, *, tied: bool = False) -> Pipeline:
    """The real pipeline on a tiny model: build_tiny_dense, an instruct stand-in, `pdmoe upcycle`, fake CPT."""
    from pdmoe.tiny import build_tiny_dense, perturb_checkpoint
    from pdmoe.upcycle import upcycle

    base = build_tiny_dense(root / "base", tie_word_embeddings=tied)
    instruct = perturb_checkpoint(base, root / "instruct", scale=0.05)
    moe = upcycle(base, root / "moe", num_experts=4, top_k=2)
    cpt = root / "cpt"
    cpt.mkdir()
    for path in moe.iterdir():
        if path.suffix != ".safetensors":
            (cpt / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(moe / "model.safetensors"))
    save_file(fake_cpt(tensors), str(cpt / "model.safetensors"), {"format": "pt"})
    return Pipeline(base, instruct, cpt)


def graft_command(base: Path, instruct: Path, cpt: Path, out: Path, *options: str) -> list[str]:
    """``pdmoe graft`` arguments for ``pdmoe.cli.main``."""
    return [
        "graft",
        "--base",
        str(base),
        "--instruct",
        str(instruct),
        "--cpt",
        str(cpt),
        "--out",
        str(out),
        *options,
    ]
