"""No command runs code that came with a checkpoint: remote-code configs and pickles are refused,
outputs carry no remote-code field, and every transformers load in pdmoe passes trust_remote_code=False."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

import pdmoe
from pdmoe.cli import main
from pdmoe.tiny import build_tiny_dense
from pdmoe.upcycle import upcycle
from tests.graft_checkpoints import graft_command

REPOSITORY = Path(pdmoe.__file__).resolve().parent.parent
AUTO_MAP = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("remote-code")
    dense = build_tiny_dense(root / "dense")
    return dense, upcycle(dense, root / "moe")


def planted(source: Path, target: Path, sentinel: Path, **config_fields) -> Path:
    """A copy of ``source`` whose config points at planted modules that would create ``sentinel``."""
    shutil.copytree(source, target)
    for module in ("configuration_evil", "modeling_evil"):
        (target / f"{module}.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **config_fields}))
    return target


class Evil:
    """Unpickling this runs code: what a planted pytorch_model.bin does."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (exec, (f"open({self.sentinel!r}, 'w').write('ran')",))


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def eval_args(model: Path, data: Path) -> list[str]:
    return [
        "eval",
        "--model",
        str(model),
        "--data",
        str(data),
        "--new-langs",
        "fr",
        "--lang",
        "fr",
        "--seq-len",
        "8",
    ]


@pytest.fixture()
def text(tmp_path: Path) -> Path:
    path = tmp_path / "fr.txt"
    path.write_text("bonjour le monde, " * 40)
    return path


def test_auto_map_is_refused_by_every_command(tmp_path: Path, models, capsys, text) -> None:
    dense, moe = models
    sentinel = tmp_path / "ran"
    evil_dense = planted(dense, tmp_path / "evil-dense", sentinel, auto_map=AUTO_MAP)
    evil_moe = planted(moe, tmp_path / "evil-moe", sentinel, auto_map=AUTO_MAP)
    message = "maps model classes to Python files shipped with the checkpoint (auto_map"
    code, err = run(capsys, "upcycle", "--model", str(evil_dense), "--out", str(tmp_path / "out"))
    assert code == 2 and message in err and "delete the auto_map entry" in err
    code, err = run(capsys, *eval_args(evil_moe, text))
    assert code == 2 and message in err
    code, err = run(
        capsys, "cpt", "--model", str(evil_moe), "--data", str(text), "--lang", "fr", "--new-langs", "fr",
        "--out", str(tmp_path / "cpt"), "--seq-len", "8", "--max-steps", "1",
    )  # fmt: skip
    assert code == 2 and message in err
    assert not sentinel.exists() and not (tmp_path / "out").exists() and not (tmp_path / "cpt").exists()


def test_tokenizer_with_remote_code_is_refused_where_it_is_loaded(
    tmp_path: Path, models, capsys, text
) -> None:
    _, moe = models
    model = tmp_path / "moe"
    shutil.copytree(moe, model)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(
        json.dumps({**settings, "auto_map": {"AutoTokenizer": ["evil.Tok", None]}})
    )
    code, err = run(capsys, *eval_args(model, text))
    assert code == 2 and f"{model / 'tokenizer_config.json'} maps model classes to Python files" in err


def test_outputs_carry_no_remote_code_fields(tmp_path: Path, models, capsys) -> None:
    dense, _ = models
    source = tmp_path / "dense"
    shutil.copytree(dense, source)
    config = json.loads((source / "config.json").read_text())
    config |= {"trust_remote_code": True, "architectures": ["EvilForCausalLM", "LlamaForCausalLM"]}
    (source / "config.json").write_text(json.dumps(config))
    settings = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(
        json.dumps({**settings, "auto_map": {"AutoTokenizer": ["evil.Tok", None]}})
    )
    assert run(capsys, "upcycle", "--model", str(source), "--out", str(tmp_path / "moe"))[0] == 0
    written = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert "trust_remote_code" not in written and written["architectures"] == ["MoEForCausalLM"]
    tokenizer = json.loads((tmp_path / "moe" / "tokenizer_config.json").read_text())
    assert "auto_map" not in tokenizer and tokenizer["eos_token"] == settings["eos_token"]
    # a dense CPT (classic chat vector): the output config is CPT's, its custom architecture dropped
    assert run(capsys, *graft_command(dense, dense, source, tmp_path / "g"))[0] == 0
    grafted = json.loads((tmp_path / "g" / "config.json").read_text())
    assert "trust_remote_code" not in grafted and grafted["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in json.loads((tmp_path / "g" / "tokenizer_config.json").read_text())


def test_pickles_are_never_loaded_by_eval(tmp_path: Path, models, capsys, text) -> None:
    _, moe = models
    sentinel = tmp_path / "ran"
    only_pickle = tmp_path / "only-pickle"
    only_pickle.mkdir()
    shutil.copy(moe / "config.json", only_pickle / "config.json")
    torch.save({"weights": Evil(sentinel)}, only_pickle / "pytorch_model.bin")
    refusal = "holds pickle checkpoints (pytorch_model.bin); pdmoe reads safetensors only"
    code, err = run(capsys, *eval_args(only_pickle, text))
    assert code == 2 and refusal in err
    cpt = ["cpt", "--model", str(only_pickle), "--data", str(text), "--lang", "fr", "--new-langs", "fr"]
    code, err = run(capsys, *cpt, "--out", str(tmp_path / "cpt"))
    assert code == 2 and refusal in err and not (tmp_path / "cpt").exists()
    both = tmp_path / "both"
    shutil.copytree(moe, both)
    torch.save({"weights": Evil(sentinel)}, both / "pytorch_model.bin")
    code, err = run(capsys, *eval_args(both, text), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert not sentinel.exists()


def _from_pretrained_calls(path: Path) -> list[tuple[int, ast.Call]]:
    tree = ast.parse(path.read_text())
    return [
        (node.lineno, node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "from_pretrained"
    ]


def _loads_safely(call: ast.Call) -> bool:
    for keyword in call.keywords:
        if keyword.arg == "trust_remote_code":
            return isinstance(keyword.value, ast.Constant) and keyword.value.value is False
        if keyword.arg is None and isinstance(keyword.value, ast.Name) and keyword.value.id == "SAFE_LOADING":
            return True
    return False


def test_every_transformers_load_in_pdmoe_refuses_remote_code() -> None:
    unsafe = [
        f"{path.relative_to(REPOSITORY)}:{line}"
        for folder in ("pdmoe", "cpt", "kernels", "bench")
        for path in sorted((REPOSITORY / folder).rglob("*.py"))
        for line, call in _from_pretrained_calls(path)
        if not _loads_safely(call)
    ]
    assert unsafe == []
    assert _from_pretrained_calls(REPOSITORY / "pdmoe" / "io" / "hf_loading.py")  # the scan sees calls


def test_architectures_known_without_transformers_are_transformers_or_pdmoe_classes() -> None:
    """``without_remote_code`` trusts these names without importing transformers: each must be a
    class transformers defines (a dense family pdmoe supports) or pdmoe's own."""
    import transformers

    from pdmoe.families import FAMILIES
    from pdmoe.io.model_config import KNOWN_ARCHITECTURES, without_remote_code

    assert set(KNOWN_ARCHITECTURES) - set(transformers.__all__) == {"MoEForCausalLM"}
    assert len(KNOWN_ARCHITECTURES) == len(FAMILIES) + 1
    kept = without_remote_code({"architectures": ["MixtralForCausalLM", "EvilForCausalLM"]})
    assert kept["architectures"] == ["MixtralForCausalLM"]  # asked of transformers' index
