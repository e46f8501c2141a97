"""A tiny upcycled model, learnable text and run helpers for the ``test_cpt_*`` modules.

The text is a random walk over a small vocabulary per language, so a few dozen CPU steps visibly
lower the loss; runs use short sequences and small batches.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from pdmoe.cpt import TrainConfig
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
ACCELERATE_CONFIGS = Path(__file__).parents[1] / "cpt" / "accelerate_configs"


def write_words(path: Path, words: list[str], docs: int, lang: str | None, seed: int) -> Path:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(24)) for _ in range(docs)]
    if path.suffix == ".jsonl":
        path.write_text(
            "".join(json.dumps({"text": t, **({"lang": lang} if lang else {})}) + "\n" for t in texts)
        )
    else:
        path.write_text("\n\n".join(texts) + "\n")
    return path


def build_setup(root: Path) -> dict[str, Path]:
    """A tiny Llama, its 4-expert top-2 upcycle, French JSONL and English plain text, a token cache."""
    dense = build_tiny_dense(root / "dense", "llama", seed=0)
    return {
        "root": root,
        "dense": dense,
        "moe": upcycle(dense, root / "moe", num_experts=4, top_k=2),
        "fr": write_words(root / "fr.jsonl", FR, 120, "fr", seed=1),
        "en": write_words(root / "en.txt", EN, 60, None, seed=2),
        "cache": root / "cache",
    }


def train_config(setup: dict[str, Path], out: str, **overrides) -> TrainConfig:
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


def command_line(config: TrainConfig) -> list[str]:
    """The ``pdmoe cpt`` options of ``config`` (the options these tests change)."""
    options = ["--model", str(config.model), "--data", *map(str, config.data), "--out", str(config.out)]
    options += ["--new-langs", *config.new_langs, "--cache-dir", str(config.cache_dir), "--no-progress"]
    for name in (
        "seq_len",
        "micro_batch_size",
        "grad_accum",
        "max_steps",
        "lr",
        "warmup_steps",
        "max_grad_norm",
        "log_every",
        "save_every",
        "keep_checkpoints",
    ):
        options += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    options += ["--bf16", config.bf16]
    if config.resume is not None:
        options += ["--resume", str(config.resume)]
    return options


def launch_processes(
    config_file: str, program: list[str], env: dict[str, str] | None = None, processes: int = 2
) -> None:
    """``accelerate launch`` CPU processes with one of the repository's accelerate configs."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / config_file),
        "--num_processes",
        str(processes),
        "--num_cpu_threads_per_process",
        "1",
        "--main_process_port",
        str(_free_port()),
        *program,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def _free_port() -> int:
    """A port no other test run on this machine is using (the default one may be taken)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
