"""What pdmoe.cpt does with hostile or broken input: planted pickles, foreign or corrupt resume
folders, bad numbers, a diverging loss, a full disk."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pdmoe.cli import flag_spelling
from pdmoe.cli.cpt import add_cpt_arguments
from pdmoe.cpt import train
from pdmoe.cpt.__main__ import main as cpt_main
from pdmoe.cpt.settings import DEFAULT_LPR_COEF
from pdmoe.errors import CheckpointError, Option, PdmoeError, Problem, TrainingError, UsageError
from pdmoe.modeling import MoEForCausalLM
from tests.cpt_runs import build_setup, command_line, metrics, tensors, train_config

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(max_steps=6, save_every=2, keep_checkpoints=0, log_every=1)
RESUME = Option("resume", "latest")
# Every file accelerate's load_state reads (and unpickles) from a checkpoint folder.
ACCELERATE_STATE_FILES = (
    "custom_checkpoint_0.pkl",
    "optimizer.bin",
    "scheduler.bin",
    "sampler.bin",
    "scaler.pt",
    "random_states_0.pkl",
    "random_states_1.pkl",
    "pytorch_model.bin",
    "pytorch_model_fsdp.bin",
    "optimizer_0.bin",
    "dl_state_dict.bin",
)


def _as_cpt_prints(error: PdmoeError) -> str:
    """``error`` as the command line prints it: its options named by ``pdmoe cpt``'s flags."""
    parser = argparse.ArgumentParser()
    add_cpt_arguments(parser)
    return error.render(flag_spelling(parser))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return build_setup(tmp_path_factory.mktemp("cpt-reliability"))


@pytest.fixture(scope="module")
def uninterrupted(setup) -> Path:
    """Six steps with checkpoints after steps 2 and 4."""
    return train(train_config(setup, "uninterrupted", **RUN))


def _same_weights(a: Path, b: Path) -> bool:
    expected, got = tensors(a), tensors(b)
    return expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _Planted:
    """Unpickling this creates ``marker``: what a planted pickle could do instead is anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_planted_pickles_never_run_and_resume_is_exact(setup, uninterrupted, tmp_path):
    checkpoint = shutil.copytree(uninterrupted / "checkpoints/step-00000004", tmp_path / "step-00000004")
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_Planted(marker))
    for name in ACCELERATE_STATE_FILES:
        (checkpoint / name).write_bytes(payload)
    with contextlib.suppress(RuntimeError):  # what accelerate did; the code runs before torch's check
        torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    assert marker.exists(), "the planted pickle does not run code: the test would prove nothing"
    marker.unlink()

    resumed = train(train_config(setup, "resumed-planted", resume=checkpoint, **RUN))
    assert not marker.exists()
    assert _same_weights(uninterrupted, resumed)
    assert [r["step"] for r in metrics(resumed)] == [5, 6]


def test_resume_refuses_foreign_and_corrupt_folders_without_touching_anything(setup, uninterrupted, tmp_path):
    out = uninterrupted
    before = _snapshot(out)

    def refused(folder: Path, message: str, error: type[Exception] = CheckpointError) -> None:
        with pytest.raises(error, match=message):
            train(train_config(setup, "uninterrupted", resume=folder, **RUN))
        assert _snapshot(out) == before

    refused(setup["moe"], r"is not a training checkpoint of pdmoe \(no trainer_state.json\)")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "trainer_state.json").write_text(json.dumps({"step": 4, "position": 16}))
    refused(foreign, r"is not a training checkpoint of pdmoe \(trainer_state.json lacks its marker\)")

    broken = shutil.copytree(out / "checkpoints/step-00000004", tmp_path / "broken")
    state = (broken / "trainer_state.json").read_text()
    (broken / "trainer_state.json").write_text(state[: len(state) // 2])
    refused(broken, r"trainer_state.json is corrupt \(")
    (broken / "trainer_state.json").write_text(state.replace('"step": 4', '"step": "4"'))
    refused(broken, r"trainer_state.json is corrupt \(bad or missing step\)")
    (broken / "trainer_state.json").write_text(state)
    part = broken / "rank-00000.safetensors"
    data = part.read_bytes()
    part.write_bytes(data[:-100])
    refused(broken, r"rank-00000.safetensors has \d+ bytes, not \d+ \(truncated or replaced\)")
    part.write_bytes(b"\xff" * len(data))
    refused(broken, r"rank-00000.safetensors is corrupt \(")
    other = json.loads(state)
    other["settings"]["seed"] = 1
    (broken / "trainer_state.json").write_text(json.dumps(other))
    refused(broken, r"does not match this run's settings \(seed: checkpoint 1, this run 0\)", UsageError)


def test_a_checkpoint_from_before_a_defaulted_option_resumes_exactly(setup, uninterrupted, tmp_path):
    """A checkpoint whose settings lack an option (as one written before the option existed) resumes
    bit-exactly when the run keeps that option's default; another value, or any changed setting the
    checkpoint holds, is refused."""
    older = shutil.copytree(uninterrupted / "checkpoints/step-00000004", tmp_path / "older")
    state = json.loads((older / "trainer_state.json").read_text())
    assert state["settings"].pop("lpr_coef") == DEFAULT_LPR_COEF
    (older / "trainer_state.json").write_text(json.dumps(state))

    resumed = train(train_config(setup, "resumed-older", resume=older, **RUN))
    assert _same_weights(uninterrupted, resumed)
    untimed = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(resumed)]
    expected = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(uninterrupted)][4:]
    assert [r["step"] for r in untimed] == [5, 6] and untimed == expected

    def refused(message: str, **changed) -> None:
        out = setup["root"] / "resumed-older-refused"
        with pytest.raises(UsageError, match=message):
            train(train_config(setup, out.name, resume=older, **{**RUN, **changed}))
        assert not out.exists()

    refused(r"\(lpr_coef: checkpoint from before the option, so 0.02, this run 0.5\)", lpr_coef=0.5)
    refused(r"\(seed: checkpoint 0, this run 1\)", seed=1)
    state["settings"]["bucket_size"] = 8  # an option of a newer pdmoe
    (older / "trainer_state.json").write_text(json.dumps(state))
    refused(r"\(bucket_size: checkpoint 8, unknown to this pdmoe\)")


def test_command_line_errors_are_one_line_with_exit_status_2(setup, uninterrupted, tmp_path, capsys):
    broken = shutil.copytree(uninterrupted / "checkpoints/step-00000002", tmp_path / "broken")
    (broken / "trainer_state.json").write_text("{")
    config = train_config(setup, "cli", resume=broken, **RUN)
    assert cpt_main(command_line(config)) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdmoe cpt: error: ") and "is corrupt" in err and err.count("\n") == 1
    mismatched = shutil.copytree(uninterrupted / "checkpoints/step-00000002", tmp_path / "mismatched")
    state = json.loads((mismatched / "trainer_state.json").read_text())
    state["settings"]["seed"] = 1
    (mismatched / "trainer_state.json").write_text(json.dumps(state))
    assert cpt_main(command_line(train_config(setup, "cli-mismatch", resume=mismatched, **RUN))) == 2
    assert capsys.readouterr().err == (
        f"pdmoe cpt: error: --resume {mismatched} does not match this run's settings (seed: checkpoint 1, "
        "this run 0); rerun with the original settings, or start a fresh run in a new --out\n"
    )
    for option, value in (("--lr", "nan"), ("--lr", "inf"), ("--max-grad-norm", "nan"), ("--max-steps", "0")):
        config = train_config(setup, "cli-numbers", **RUN)
        assert cpt_main([*command_line(config), option, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pdmoe cpt: error: {option} must be") and err.count("\n") == 1, err
    assert not (setup["root"] / "cli-numbers").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("lr", float("inf"), r" must be a finite number > 0, got inf$"),
        ("lr", 0.0, r" must be a finite number > 0, got 0.0$"),
        ("max_grad_norm", -1.0, r" must be a finite number >= 0"),
        ("min_lr_ratio", 1.5, r" must be at most 1"),
        ("weight_decay", float("-inf"), r" must be a finite number >= 0"),
        ("aux_loss_coef", float("nan"), r" must be a finite number >= 0, got nan$"),
        ("lpr_coef", -0.1, r" must be a finite number >= 0"),
        ("max_steps", 0, r" must be a whole number from 1"),
        ("max_tokens", 0, r" must be a whole number from 1"),
        ("micro_batch_size", 2.0, r" must be a whole number from 1 to 2\*\*63-1, got 2.0$"),
        ("seed", 10**23, r" must be a whole number from 0 to 2\*\*63-1"),
        ("grad_accum", True, r" must be a whole number"),
    ],
)
def test_bad_numbers_are_refused_before_anything_is_written(setup, option, value, message):
    with pytest.raises(UsageError, match=message) as caught:
        train(train_config(setup, "numbers", **{option: value}))
    assert caught.value.problem is Problem.INVALID and caught.value.options == (Option(option),)
    assert not (setup["root"] / "numbers").exists()


def test_a_diverging_run_stops_at_the_first_non_finite_loss(setup, monkeypatch):
    from pdmoe.cpt import trainer

    step = trainer.train_step

    def poisoned_at_step_five(run):
        if run.state.step == 4:  # a router weight blows up in step 5, after the step-4 checkpoint
            model = run.accelerator.unwrap_model(run.model)
            model.model.layers[1].mlp.gate.weight.data[0, 0] = float("inf")
        return step(run)

    monkeypatch.setattr(trainer, "train_step", poisoned_at_step_five)
    config = train_config(setup, "diverging", **RUN)
    with pytest.raises(TrainingError) as raised:
        train(config)
    message = str(raised.value)
    assert message.startswith("step 5: loss is nan, lm_loss is nan") and "gradient norm is nan" in message
    assert "the last good checkpoint is" in message and message.count("step-00000004") == 1
    assert raised.value.options == (Option("lr"), Option("warmup_steps"), RESUME)
    assert _as_cpt_prints(raised.value).endswith(
        "(lower --lr, raise --warmup-steps or check the data, then rerun with --resume latest)"
    )
    assert sorted(p.name for p in (config.out / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000004",
    ]
    assert not (config.out / "config.json").exists() and not (config.out / "model.safetensors").exists()
    lines = (config.out / "metrics.jsonl").read_text().splitlines()
    records = [
        json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in metrics")) for line in lines
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_full_disk_keeps_the_previous_checkpoint_and_writes_no_final_model(setup, uninterrupted, monkeypatch):
    from pdmoe.cpt import training_checkpoint

    def full_disk(tensors, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    def final_save_fills_disk(model, folder, **kwargs):
        Path(folder).mkdir()
        full_disk({}, Path(folder) / "model.safetensors")

    config = train_config(setup, "full-disk", **RUN)
    save_file = training_checkpoint.save_file

    def disk_fills_after_step_two(tensors, path, **kwargs):
        return (save_file if "00000002" in str(path) else full_disk)(tensors, path, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(training_checkpoint, "save_file", disk_fills_after_step_two)
        with pytest.raises(CheckpointError) as raised:
            train(config)
    assert "cannot write the training checkpoint" in str(raised.value)
    assert "No space left on device" in str(raised.value) and "step-00000002) is kept" in str(raised.value)
    assert raised.value.options == (RESUME,)
    assert _as_cpt_prints(raised.value).endswith("is kept: free space and rerun with --resume latest")
    assert sorted(p.name for p in (config.out / "checkpoints").iterdir()) == ["step-00000002"]

    resume = train_config(setup, "full-disk", resume="latest", **RUN)
    with monkeypatch.context() as patch:
        patch.setattr(MoEForCausalLM, "save_pretrained", final_save_fills_disk)
        with pytest.raises(
            CheckpointError, match=r"cannot write the final model into .* \(No space left on device\)"
        ) as raised:
            train(resume)
    assert raised.value.options == (RESUME,)
    assert _as_cpt_prints(raised.value).endswith(
        "the training checkpoints are kept: free space and rerun with --resume latest"
    )
    assert not any((config.out / name).exists() for name in ("config.json", "model.safetensors"))
    assert not list(config.out.glob(".*partial"))
    assert sorted(p.name for p in (config.out / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000004",
    ]

    assert _same_weights(uninterrupted, train(resume))


def test_every_random_number_generator_comes_back_from_a_checkpoint_file(tmp_path):
    from pdmoe.cpt.training_checkpoint import _rng_states, _set_rng_states

    tensors, metadata = _rng_states(torch.device("cpu"))
    save_file(tensors, tmp_path / "rank-00000.safetensors", metadata=metadata)
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    with safe_open(tmp_path / "rank-00000.safetensors", framework="pt") as handle:
        saved = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        saved[None] = handle.metadata()
    _set_rng_states(tmp_path, saved, torch.device("cpu"))
    got = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and (got[2] == expected[2]).all()


def test_a_failed_metrics_line_says_how_to_go_on(tmp_path):
    from pdmoe.cpt.metrics import append_metrics

    path = tmp_path / "gone" / "metrics.jsonl"
    with pytest.raises(CheckpointError, match=r"cannot append to .* \(No such file or directory\)") as raised:
        append_metrics(path, {"step": 1})
    assert raised.value.problem is None and raised.value.options == (RESUME,)
    assert _as_cpt_prints(raised.value) == (
        f"cannot append to {path} (No such file or directory); free space and rerun with --resume latest"
    )
