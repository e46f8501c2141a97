"""A checkpoint's ``config.json``: read safely, checked against the tensors, written without remote code.

transformers builds a model from the config alone: a field that disagrees with the tensors (a
hidden size, a layer count, a vocabulary size) or that is missing (a default fills it in) gives a
model that does not compute what the checkpoint computed, or fails late. And ``auto_map`` points
transformers at Python files shipped with the checkpoint: pdmoe never runs them, so it refuses
such a config rather than silently treating the model as the stock family, and it writes no
remote-code field into what it produces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pdmoe.errors import CheckpointError, UsageError
from pdmoe.families import FAMILIES, FAMILY_TITLES
from pdmoe.io.strict_json import read_json_object
from pdmoe.layout import EMBED_TOKENS, DenseProjection, MoETensor, layer_index, match_dense, match_moe

CONFIG_FILE = "config.json"
# The weights: one file, or shards listed by an index.
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Fields through which a config or tokenizer config makes transformers import code from the checkpoint.
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines", "trust_remote_code")
MOE_MODEL_TYPE = "pdmoe"  # the model_type of pdmoe's MoE checkpoints (``MoEConfig``)
# Architectures known without asking transformers (importing it takes a second): pdmoe's own
# class (registered with transformers' Auto classes on ``import pdmoe``) and transformers' causal
# LMs of the dense families pdmoe supports (the tests check that transformers defines them).
KNOWN_ARCHITECTURES = ("MoEForCausalLM", *(family.architecture for family in FAMILIES.values()))
# Integer fields every supported family defines, and that the tensors must agree with.
STRUCTURE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
# Integer fields of a pdmoe MoE config (checked when present).
MOE_COUNT_FIELDS = ("num_experts", "num_experts_per_tok")
_SHOWN_PROBLEMS = 5


def refuse_remote_code(settings: Mapping[str, Any], source: Path) -> None:
    """A CheckpointError when ``settings`` (a parsed config file) would make transformers import code."""
    if "auto_map" in settings:
        raise CheckpointError(
            f"{source} maps model classes to Python files shipped with the checkpoint (auto_map: "
            f"{settings['auto_map']!r}); pdmoe never runs code from a checkpoint and cannot know whether "
            "that code computes what the stock model family computes. If the model is a stock "
            f"{FAMILY_TITLES}, delete the auto_map entry and run again"
        )


def check_model_folder(path: Path) -> None:
    """A CheckpointError, naming what ``path`` is instead, unless it is a folder."""
    if path.is_dir():
        return
    if path.exists():
        raise CheckpointError(
            f"{path} is a file, not a model folder; give the checkpoint folder (the one holding config.json)"
        )
    raise CheckpointError(f"checkpoint directory {path} does not exist")


def read_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory: a JSON object without remote code, with a model_type."""
    check_model_folder(Path(directory))
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}; is it a Hugging Face checkpoint directory?")
    config = read_json_object(path)
    refuse_remote_code(config, path)
    if not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{path} has no model_type; re-download or re-create it")
    return config


def require_moe(config: Mapping[str, Any], directory: str | Path) -> None:
    """A UsageError, with the command that makes one, when ``config`` is not an upcycled MoE's."""
    if config.get("model_type") != MOE_MODEL_TYPE:
        raise UsageError(
            f"{directory} is a dense {config.get('model_type')!r} model, not an upcycled MoE; "
            f"run `pdmoe upcycle --model {directory} --out MOE_DIR` first and train MOE_DIR"
        )


def without_remote_code(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a config (or tokenizer config) with no field that would make transformers run code:
    no ``auto_map`` / ``trust_remote_code`` / ``custom_pipelines``, and only architectures that
    transformers or pdmoe define."""
    clean = {key: value for key, value in settings.items() if key not in REMOTE_CODE_KEYS}
    architectures = clean.get("architectures")
    if isinstance(architectures, list):
        names = [name for name in architectures if isinstance(name, str)]
        defined = _transformers_names(names)
        known = [name for name in names if name in KNOWN_ARCHITECTURES or name in defined]
        if known:
            clean["architectures"] = known
        else:
            del clean["architectures"]
    return clean


def _transformers_names(names: list[str]) -> set[str]:
    """Which of ``names`` (not ``KNOWN_ARCHITECTURES``) transformers defines, by the index of its
    lazy top-level module: asking the module (``hasattr``) would import the model's modeling code
    (seconds, ~190 MiB)."""
    unknown = set(names).difference(KNOWN_ARCHITECTURES)
    if not unknown:
        return set()
    import transformers  # here: it takes a second, and only writers of unusual configs need it

    return unknown & set(transformers.__all__)


def _structure(config: Mapping[str, Any], path: Path) -> dict[str, int]:
    values = {field: config.get(field) for field in STRUCTURE_FIELDS}
    bad = [field for field, value in values.items() if type(value) is not int or value <= 0]
    if bad:
        raise CheckpointError(
            f"{path} has no positive integer {', '.join(bad)} ({', '.join(repr(values[f]) for f in bad)}); "
            "the config does not describe a supported model: re-download or re-create it"
        )
    return values  # type: ignore[return-value]


def structure_problems(
    config: Mapping[str, Any], tensors: Iterable[tuple[str, tuple[int, ...]]], path: Path
) -> list[str]:
    """Where the config's sizes disagree with the tensor shapes (``name, shape`` pairs)."""
    size = _structure(config, path)
    hidden, ffn, vocab = size["hidden_size"], size["intermediate_size"], size["vocab_size"]
    problems = _moe_field_problems(config)
    if problems:  # the shapes below would only repeat them
        return problems
    experts = config.get("num_experts")
    expected: dict[DenseProjection | MoETensor, tuple[Any, ...]] = {
        DenseProjection.GATE: (ffn, hidden),
        DenseProjection.UP: (ffn, hidden),
        DenseProjection.DOWN: (hidden, ffn),
        MoETensor.ROUTER: (experts, hidden),
        MoETensor.GATE_UP: (experts, 2 * ffn, hidden),
        MoETensor.DOWN: (experts, hidden, ffn),
    }
    layers: set[int] = set()
    moe_layers: set[int] = set()
    for name, shape in tensors:
        if (layer := layer_index(name)) is not None:
            layers.add(layer)
            if match_moe(name) is not None:
                moe_layers.add(layer)
        if name.endswith(EMBED_TOKENS) and shape != (vocab, hidden):
            problems.append(f"{name} is {list(shape)}, but vocab_size x hidden_size is [{vocab}, {hidden}]")
        match = match_dense(name) or match_moe(name)
        if match is not None and shape != (want := expected[match[1]]):
            problems.append(f"{name} is {list(shape)}, the config implies {list(want)}")
    if layers and layers != set(range(size["num_hidden_layers"])):
        problems.append(
            f"num_hidden_layers is {size['num_hidden_layers']}, but the tensors have layers "
            f"{min(layers)}..{max(layers)} ({len(layers)} of them)"
        )
    if problem := moe_layers_problem(config, moe_layers):
        problems.append(problem)
    return problems


def moe_layers_problem(config: Mapping[str, Any], found: Iterable[int]) -> str | None:
    """How the config's ``moe_layers`` disagrees with the layers that have MoE tensors, or None."""
    declared, found = config.get("moe_layers"), sorted(found)
    if isinstance(declared, list) and sorted(declared) != found:
        return f"moe_layers is {declared}, but the tensors have MoE layers {found}"
    return None


def _moe_field_problems(config: Mapping[str, Any]) -> list[str]:
    """Wrongly typed MoE fields of a pdmoe config (a string "4" would fail late, or never)."""
    problems = [
        f"{field} is {config[field]!r}, not a positive integer"
        for field in MOE_COUNT_FIELDS
        if field in config and (type(config[field]) is not int or config[field] <= 0)
    ]
    layers = config.get("moe_layers")
    if layers is not None and not (isinstance(layers, list) and all(type(i) is int for i in layers)):
        problems.append(f"moe_layers is {layers!r}, not a list of layer numbers")
    if "norm_topk_prob" in config and type(config["norm_topk_prob"]) is not bool:
        problems.append(f"norm_topk_prob is {config['norm_topk_prob']!r}, not true or false")
    return problems


def check_config_matches_tensors(
    config: Mapping[str, Any], tensors: Iterable[tuple[str, tuple[int, ...]]], directory: Path
) -> None:
    """A CheckpointError listing the first disagreements between ``config.json`` and the tensors."""
    path = Path(directory) / CONFIG_FILE
    problems = structure_problems(config, tensors, path)
    if len(problems) == 1:  # one line, as every expected failure
        raise CheckpointError(
            f"{path} does not describe the tensors of {directory}: {problems[0]}; fix config.json or re-download"
        )
    if problems:
        shown = "\n  ".join(problems[:_SHOWN_PROBLEMS])
        more = (
            f"\n  ... and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
        )
        raise CheckpointError(
            f"{path} does not describe the tensors of {directory}:\n  {shown}{more}\n"
            "A model built from this config would not be the checkpoint's model; fix config.json or re-download"
        )
