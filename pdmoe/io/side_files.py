"""The non-tensor files of a Hugging Face checkpoint that pdmoe carries from input to output."""

from __future__ import annotations

import shutil
from pathlib import Path

GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    *CHAT_TEMPLATE_FILES,
)
SIDE_FILES = (*TOKENIZER_FILES, GENERATION_CONFIG)


def copy_side_files(source: Path, out_dir: Path, names: tuple[str, ...] = SIDE_FILES) -> list[str]:
    """Copy the tokenizer / generation files that exist in ``source``; returns the names copied."""
    copied = []
    for name in names:
        path = Path(source) / name
        if path.is_file():
            shutil.copyfile(path, Path(out_dir) / name)
            copied.append(name)
    return copied
