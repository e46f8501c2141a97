"""Tiny random checkpoints of the supported dense families, built locally.

Nothing can be downloaded in CI or in a quick try-out, so tests, benchmarks and ``pdmoe demo``
build their models here: a real transformers model of the chosen family with small sizes and
random weights, saved with ``save_pretrained`` (safetensors), with a byte-level tokenizer that
covers any UTF-8 text and a chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from pdmoe.families import DEFAULT_FAMILY, get_family
from pdmoe.io.hf_loading import load_causal_lm, load_tokenizer

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
TINY_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": 264,
}
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens plus <pad>, <s>, </s> (ids 256, 257, 258)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_dense(
    out_dir: str | Path,
    family: str = DEFAULT_FAMILY,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """Save a tiny random dense causal LM of ``family`` (and its tokenizer) to ``out_dir``."""
    family_facts = get_family(family)
    tokenizer = byte_tokenizer()
    sizes = {
        **TINY_SIZES,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **overrides,
    }
    for name, value in family_facts.tiny_defaults.items():
        sizes.setdefault(name, value)
    config = family_facts.dense_config_class()(**sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        # Norm weights start at 1 and biases at 0: randomise them so tests see every tensor.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def perturb_checkpoint(source: str | Path, out_dir: str | Path, scale: float = 0.01, seed: int = 1) -> Path:
    """A checkpoint like ``source`` with every weight moved by N(0, scale): a stand-in instruct model."""
    model = load_causal_lm(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
    out = Path(out_dir)
    model.save_pretrained(out)
    load_tokenizer(source).save_pretrained(out)
    return out
