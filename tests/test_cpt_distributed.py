"""pdmoe.cpt on two CPU processes (gloo) against one process with the same global batch: DDP and
FSDP2 through accelerate, launched with the repository's accelerate configs; refused strategies."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from pdmoe.cpt import train
from pdmoe.cpt.trainer import _check_strategy
from pdmoe.errors import UsageError
from tests.cpt_runs import build_setup, command_line, launch_two_processes, metrics, tensors, train_config

pytestmark = pytest.mark.usefixtures("one_thread")

# Two processes × micro-batches of 2 = one process × 2 accumulated micro-batches of 2. The clipping
# norm is below every step's gradient norm, so clipping by the norm over all processes is tested.
RUN = dict(max_steps=4, micro_batch_size=2, log_every=1, save_every=2, keep_checkpoints=0, max_grad_norm=0.2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return build_setup(tmp_path_factory.mktemp("cpt-distributed"))


@pytest.fixture(scope="module")
def one_process(setup) -> Path:
    return train(train_config(setup, "one-process", grad_accum=2, **RUN))


def _assert_same_run(one: Path, two: Path, rtol: float) -> float:
    """Same steps, losses, expert loads and final weights; returns the largest weight difference."""
    expected, got = tensors(one), tensors(two)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=1e-6, msg=name)
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert (a["step"], a["tokens_seen"]) == (b["step"], b["tokens_seen"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert (
            a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
            and a["grad_norm"] > RUN["max_grad_norm"]
        )
        assert a["expert_load"] == b["expert_load"]
    return max((got[name] - expected[name]).abs().max().item() for name in expected)


def test_ddp_two_processes_match_one(setup, one_process):
    out = train_config(setup, "ddp", grad_accum=1, **RUN)
    # ACCELERATE_USE_CPU: the processes run on the CPU over gloo (MULTI_CPU, DDP).
    launch_two_processes("ddp.yaml", ["-m", "pdmoe.cpt", *command_line(out)], {"ACCELERATE_USE_CPU": "1"})
    _assert_same_run(one_process, out.out, rtol=1e-4)


def test_fsdp2_matches_one_process_shards_experts_and_resumes(setup, one_process, tmp_path):
    fsdp = train_config(setup, "fsdp2", grad_accum=1, **RUN)
    launcher = [str(Path(__file__).with_name("fsdp_on_cpu.py"))]
    launch_two_processes(
        "fsdp2.yaml", [*launcher, *command_line(fsdp)], {"PDMOE_TEST_MEMORY_REPORT": str(tmp_path)}
    )
    difference = _assert_same_run(one_process, fsdp.out, rtol=1e-5)
    assert difference < 1e-6  # 1.5e-8 measured

    # Every expert tensor, the 3 new experts and the frozen original one alike, is split along its
    # rows (dim 1), not by expert: each process holds half of every expert.
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        shards = report["expert_shards"]
        assert len(shards) == 2 * 2 * 3  # 2 tensors x (frozen, trainable) x 3 MoE layers
        for name, (shape, placements) in shards.items():
            experts = 1 if ".frozen_" in name else 3
            rows = 2 * 96 if name.endswith("gate_up_proj") else 64
            assert shape[:2] == [experts, rows // 2] and placements == ["S(1)"], name

    # Resuming the sharded checkpoint of step 2 gives the uninterrupted run's bytes.
    state = json.loads((fsdp.out / "checkpoints/step-00000002/trainer_state.json").read_text())
    assert state["sharded"] and sorted(state["files"]) == ["rank-00000.safetensors", "rank-00001.safetensors"]
    resumed = train_config(
        setup, "fsdp2-resumed", grad_accum=1, resume=fsdp.out / "checkpoints/step-00000002", **RUN
    )
    launch_two_processes("fsdp2.yaml", [*launcher, *command_line(resumed)])
    expected, got = tensors(fsdp.out), tensors(resumed.out)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    trajectory = [(r["step"], r["loss"], r["grad_norm"], r["expert_load"]) for r in metrics(resumed.out)]
    assert trajectory == [
        (r["step"], r["loss"], r["grad_norm"], r["expert_load"]) for r in metrics(fsdp.out)[2:]
    ]


@pytest.mark.parametrize(
    ("kind", "fsdp2", "message"),
    [
        (DistributedType.FSDP, False, r"FSDP version 1 is not supported .* set fsdp_version: 2"),
        (
            DistributedType.DEEPSPEED,
            False,
            r"DEEPSPEED set-up is not supported by pdmoe cpt; use FSDP \(fsdp_version: 2\) or DDP",
        ),
    ],
)
def test_strategies_that_would_clip_or_save_wrongly_are_refused(kind, fsdp2, message):
    with pytest.raises(UsageError, match=message):
        _check_strategy(SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2))
