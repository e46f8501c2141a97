"""The family registry (pdmoe/families.py) is the one place a family's facts live: README's family
table, the help texts and transformers' classes agree with it, and a family the export knows no
reason for is refused with a clean error."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path

import pytest

from pdmoe.families import DEFAULT_FAMILY, FAMILIES, FAMILY_TITLES, get_family

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_HEADER = "| family | `model_type` | transformers class | exact `pdmoe export --format` |"


def _readme_family_rows() -> list[str]:
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(TABLE_HEADER) + 2  # past the header and its separator
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:end]


def test_readme_family_table_is_the_registry() -> None:
    expected = [
        f"| {family.title} | `{family.model_type}` | `{family.architecture}` | "
        + ", ".join(f"`{target}`" for target in family.export_targets)
        + " |"
        for family in FAMILIES.values()
    ]
    assert _readme_family_rows() == expected


def _subparser(command: str) -> argparse.ArgumentParser:
    from pdmoe.cli import _command_parser, build_parser

    return _command_parser(build_parser(command), command)


def test_help_texts_name_every_family() -> None:
    assert FAMILY_TITLES in _subparser("upcycle").description
    export_description = _subparser("export").description
    assert all(family.title in export_description for family in FAMILIES.values())
    family_option = next(a for a in _subparser("demo")._actions if a.dest == "family")
    assert family_option.choices == list(FAMILIES) and family_option.default == DEFAULT_FAMILY


def test_each_record_names_what_transformers_and_the_export_define() -> None:
    import transformers

    from pdmoe.export.formats import NativeFormat

    formats = {fmt.value for fmt in NativeFormat} - {NativeFormat.AUTO.value}
    for name, family in FAMILIES.items():
        assert name == family.model_type
        assert {family.config_class, family.architecture} <= set(transformers.__all__)
        assert family.dense_config_class().model_type == name
        module = importlib.import_module(family.modeling_module)
        assert family.dense_model_class() is getattr(module, family.model_class)
        assert isinstance(getattr(module, family.decoder_layer_class), type)
        assert family.export_targets and set(family.export_targets) <= formats


def test_an_unknown_family_is_a_usage_error_naming_the_known_ones() -> None:
    from pdmoe.errors import UsageError

    with pytest.raises(UsageError) as refused:
        get_family("gpt2")
    assert str(refused.value) == (
        "unsupported architecture 'gpt2'; pdmoe upcycles these dense families: llama, mistral, qwen2, qwen3"
    )


def _tiny_moe_config(family: str) -> dict:
    from pdmoe.config import MoEConfig
    from pdmoe.tiny import TINY_SIZES

    return MoEConfig(**TINY_SIZES, base_model_type=family).to_dict()


def test_a_family_without_an_export_reason_is_refused_cleanly(monkeypatch) -> None:
    """No KeyError: the refusal says there is no exact form, and which format works instead."""
    from pdmoe.cli import flag_spelling
    from pdmoe.errors import Option, Problem, UsageError
    from pdmoe.export.formats import NativeFormat, choose_format

    config = _tiny_moe_config("qwen3")
    monkeypatch.setitem(FAMILIES, "qwen3", dataclasses.replace(FAMILIES["qwen3"], why_not_other_targets=None))
    with pytest.raises(UsageError) as refused:
        choose_format(config, NativeFormat.MIXTRAL)
    assert (refused.value.problem, refused.value.options) == (
        Problem.INVALID,
        (Option("format", "qwen3_moe"),),
    )
    assert refused.value.render(flag_spelling(_subparser("export"))) == (
        "a qwen3 MoE has no exact mixtral form; use --format qwen3_moe (or auto)"
    )


def test_an_export_of_an_unknown_family_is_a_usage_error() -> None:
    from pdmoe.errors import UsageError
    from pdmoe.export.formats import NativeFormat, choose_format

    config = _tiny_moe_config("llama") | {"base_model_type": "gpt2"}
    with pytest.raises(UsageError, match="unsupported architecture 'gpt2'"):
        choose_format(config, NativeFormat.AUTO)
