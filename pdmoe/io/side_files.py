"""The non-tensor files of a Hugging Face checkpoint that pdmoe carries from input to output.

A JSON side file that would make transformers import code from the checkpoint (``auto_map`` in
``tokenizer_config.json``) is carried without those fields: pdmoe's outputs never run code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pdmoe.io.atomic import Staged, write_json
from pdmoe.io.model_config import REMOTE_CODE_KEYS, without_remote_code
from pdmoe.io.strict_json import read_json_object

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    TOKENIZER_CONFIG,
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
        if not path.is_file():
            continue
        settings = read_json_object(path) if name.endswith(".json") else None
        if isinstance(settings, dict) and any(key in settings for key in REMOTE_CODE_KEYS):
            write_json(Path(out_dir) / name, without_remote_code(settings))
        else:  # staged and renamed: a link already at the target is replaced, never written through
            with Staged(Path(out_dir) / name) as staged:
                shutil.copyfile(path, staged)
        copied.append(name)
    return copied
