"""Loading models and tokenizers through transformers without running anything from the checkpoint.

Every ``from_pretrained`` in pdmoe goes through here: ``trust_remote_code=False`` (never import the
checkpoint's Python files, never prompt), ``use_safetensors=True`` (never unpickle a ``.bin``), and
configs or tokenizer configs that name remote code are refused up front with one message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pdmoe.errors import CheckpointError
from pdmoe.io.model_config import read_config, refuse_remote_code
from pdmoe.io.side_files import TOKENIZER_CONFIG
from pdmoe.io.strict_json import read_json_object

# The keyword arguments of every model ``from_pretrained`` call.
SAFE_LOADING: dict[str, Any] = {"trust_remote_code": False, "use_safetensors": True}


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``directory``; refused when its config names remote code."""
    path = Path(directory) / TOKENIZER_CONFIG
    if path.is_file():
        refuse_remote_code(read_json_object(path), path)
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot load the tokenizer of {directory} ({error}); copy the tokenizer files into it"
        ) from None


def load_causal_lm(
    directory: str | Path, model_class: type[PreTrainedModel] | None = None, **kwargs: Any
) -> PreTrainedModel:
    """A causal LM from ``directory`` (``model_class``, or the Auto class), loaded with ``SAFE_LOADING``."""
    read_config(directory)
    loader = model_class if model_class is not None else AutoModelForCausalLM
    return loader.from_pretrained(directory, **SAFE_LOADING, **kwargs)
