"""Hub ids resolve through a local Hugging Face cache, offline, in every command that reads a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from pdmoe.cli import main
from pdmoe.hub import missing_files, parse_hub_id, resolve_model
from pdmoe.tiny import build_tiny_dense, perturb_checkpoint
from tests.hub_cache import cache_model

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """A cache with a base model (main) and an instruct model (main and tag v1, then a newer main)."""
    root = tmp_path_factory.mktemp("hub")
    base = build_tiny_dense(root / "base", "llama")
    instruct = perturb_checkpoint(base, root / "instruct", scale=0.02, seed=1)
    home = root / "hf-home"
    v1 = cache_model(home, "tiny-org/llama-instruct", instruct, refs=("main", "v1"))
    newer = perturb_checkpoint(base, root / "instruct-newer", scale=0.05, seed=2)
    latest = cache_model(home, "tiny-org/llama-instruct", newer, refs=("main",))
    cache_model(home, "tiny-org/llama-base", base)
    return {"home": home, "base": base, "v1": v1, "latest": latest}


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["home"] / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_hub_id_grammar():
    assert parse_hub_id("meta-llama/Llama-3.2-1B") == ("meta-llama/Llama-3.2-1B", None)
    assert parse_hub_id("Qwen/Qwen3-0.6B@v1.0") == ("Qwen/Qwen3-0.6B", "v1.0")
    assert parse_hub_id("gpt2") == ("gpt2", None)
    for not_an_id in ("/abs/path", "./llama-moe", "~/models/x", "a/b/c", "org/na--me", "x@"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_revisions_resolve_to_their_snapshots(offline):
    snapshots = offline["home"] / "hub" / "models--tiny-org--llama-instruct" / "snapshots"
    assert resolve_model("tiny-org/llama-instruct") == snapshots / offline["latest"]
    assert resolve_model("tiny-org/llama-instruct@v1") == snapshots / offline["v1"]
    assert resolve_model(f"tiny-org/llama-instruct@{offline['v1']}") == snapshots / offline["v1"]
    assert not missing_files(resolve_model("tiny-org/llama-base"))


def test_a_local_folder_wins_over_a_hub_id(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = Path("tiny-org") / "llama-base"
    local.mkdir(parents=True)
    assert resolve_model("tiny-org/llama-base") == local


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("tiny-org/not-cached", "is neither a local folder nor in the Hugging Face cache"),
        ("tiny-org/llama-base@no-such-tag", "is neither a local folder nor in the Hugging Face cache"),
        ("/no/such/folder", "checkpoint directory /no/such/folder does not exist"),
    ],
)
def test_unresolvable_references_are_one_line_errors(offline, capsys, tmp_path, reference, expected):
    code = main(["upcycle", "--model", reference, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_incomplete_cached_snapshot_names_what_it_lacks(offline, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((offline["base"] / "config.json").read_text())
    cache_model(offline["home"], "tiny-org/config-only", partial)
    code = main(["upcycle", "--model", "tiny-org/config-only", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "lacks model.safetensors" in err and "HF_HUB_OFFLINE=1" in err, err


def test_upcycle_and_graft_take_hub_ids(offline, tmp_path, capsys):
    moe = tmp_path / "moe"
    assert main(["upcycle", "--model", "tiny-org/llama-base", "--out", str(moe)]) == 0
    out = tmp_path / "final"
    args = ["--base", "tiny-org/llama-base", "--instruct", "tiny-org/llama-instruct@v1", "--cpt", str(moe)]
    assert main(["graft", *args, "--out", str(out)]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "graft.json").read_text())
    assert offline["v1"] in json.dumps(manifest)  # the instruct input is the v1 snapshot


def test_the_command_line_honours_hf_home_and_hf_hub_offline(hub, tmp_path):
    """The real command in a fresh process: the environment alone points it at the cache."""
    env = {**os.environ, "HF_HOME": str(hub["home"]), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    command = [sys.executable, "-m", "pdmoe.cli", "upcycle", "--model", "tiny-org/llama-base"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "moe")], env=env, capture_output=True, text=True, cwd=REPOSITORY
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "moe" / "config.json").is_file()
