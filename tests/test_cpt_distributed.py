"""pdmoe.cpt on two and four CPU processes (gloo) against one process with the same global batch:
DDP and FSDP2 through accelerate, launched with the repository's accelerate configs; the bytes each
FSDP2 process holds, measured after its first step, against an even split and against the memory
plan; refused strategies."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from pdmoe.cpt import train
from pdmoe.cpt.checkpoints import load_moe_model, read_moe_config
from pdmoe.cpt.freezing import Stage, apply_trainable, trainable_parts
from pdmoe.cpt.memory_plan import RunShape, meta_model, plan_memory
from pdmoe.cpt.trainer import _check_strategy
from pdmoe.errors import UsageError
from pdmoe.tiny import build_tiny_dense
from pdmoe.upcycle import upcycle
from tests.cpt_runs import build_setup, command_line, launch_processes, metrics, tensors, train_config

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
    launch_processes("ddp.yaml", ["-m", "pdmoe.cpt", *command_line(out)], {"ACCELERATE_USE_CPU": "1"})
    _assert_same_run(one_process, out.out, rtol=1e-4)


def test_fsdp2_matches_one_process_shards_experts_and_resumes(setup, one_process, tmp_path):
    fsdp = train_config(setup, "fsdp2", grad_accum=1, **RUN)
    launcher = [str(Path(__file__).with_name("fsdp_on_cpu.py"))]
    launch_processes(
        "fsdp2.yaml", [*launcher, *command_line(fsdp)], {"PDMOE_TEST_MEMORY_REPORT": str(tmp_path)}
    )
    difference = _assert_same_run(one_process, fsdp.out, rtol=1e-5)
    assert difference < 1e-6  # 1.5e-8 measured

    _assert_even_shares(fsdp, tmp_path, processes=2)

    # Resuming the sharded checkpoint of step 2 gives the uninterrupted run's bytes.
    state = json.loads((fsdp.out / "checkpoints/step-00000002/trainer_state.json").read_text())
    assert state["sharded"] and sorted(state["files"]) == ["rank-00000.safetensors", "rank-00001.safetensors"]
    resumed = train_config(
        setup, "fsdp2-resumed", grad_accum=1, resume=fsdp.out / "checkpoints/step-00000002", **RUN
    )
    launch_processes("fsdp2.yaml", [*launcher, *command_line(resumed)])
    expected, got = tensors(fsdp.out), tensors(resumed.out)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    trajectory = [(r["step"], r["loss"], r["grad_norm"], r["expert_load"]) for r in metrics(resumed.out)]
    assert trajectory == [
        (r["step"], r["loss"], r["grad_norm"], r["expert_load"]) for r in metrics(fsdp.out)[2:]
    ]


def test_fsdp2_on_four_processes_matches_one_process_with_even_shares(setup, tmp_path):
    # 3 new experts on 4 processes, split along their rows: a quarter of every expert on each.
    four = {**RUN, "save_every": 100}
    one_process = train(train_config(setup, "one-process-x4", grad_accum=4, **four))
    fsdp = train_config(setup, "fsdp2-four", grad_accum=1, **four)
    launcher = [str(Path(__file__).with_name("fsdp_on_cpu.py"))]
    launch_processes(
        "fsdp2.yaml",
        [*launcher, *command_line(fsdp)],
        {"PDMOE_TEST_MEMORY_REPORT": str(tmp_path)},
        processes=4,
    )
    assert _assert_same_run(one_process, fsdp.out, rtol=1e-5) < 1e-6
    _assert_even_shares(fsdp, tmp_path, processes=4)


def test_fsdp2_bf16_holds_frozen_weights_in_bf16_and_saves_them_exactly(setup, tmp_path):
    # Tied embeddings (as Llama-3.2-1B's): one tensor, in FSDP2's tail group.
    dense = build_tiny_dense(setup["root"] / "dense-tied", "llama", seed=0, tie_word_embeddings=True)
    moe = upcycle(dense, setup["root"] / "moe-tied", num_experts=4, top_k=2)
    fsdp = train_config(
        setup, "fsdp2-bf16", model=moe, grad_accum=1, **{**RUN, "max_steps": 2, "bf16": "yes"}
    )
    launcher = [str(Path(__file__).with_name("fsdp_on_cpu.py"))]
    launch_processes(
        "fsdp2.yaml", [*launcher, *command_line(fsdp)], {"PDMOE_TEST_MEMORY_REPORT": str(tmp_path)}
    )
    reports = _assert_even_shares(fsdp, tmp_path, processes=2)
    assert all(report["frozen_dtypes"] == ["torch.bfloat16"] for report in reports)
    # The float32 checkpoint's frozen tensors come back bit-exact (read back from the input), the
    # trained ones moved.
    before, after = tensors(moe), tensors(fsdp.out)
    assert "lm_head.weight" not in after
    for name, tensor in before.items():
        assert after[name].dtype == torch.float32
        if ".mlp.experts." in name:
            assert torch.equal(tensor[0], after[name][0]) and not torch.equal(tensor[1:], after[name][1:])
        elif not name.endswith(".mlp.gate.weight"):
            assert torch.equal(tensor, after[name]), name


def _assert_even_shares(config, report_dir: Path, processes: int) -> list[dict]:
    """Each process's bytes after its first step within 10 % of (whole model's / N) plus what cannot
    be split (buffers, AdamW's step counters), and of the memory plan; every expert tensor split
    along its rows. Returns the processes' reports."""
    reports = [json.loads((report_dir / f"rank-{rank}.json").read_text()) for rank in range(processes)]
    parts = trainable_parts(Stage.CPT)
    model = load_moe_model(config.model)
    apply_trainable(model, parts)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_bytes = 2 if config.bf16 == "yes" else 4
    trainable_bytes = sum(p.numel() for p in trainable) * 4
    expected = {
        "frozen_weights": sum(p.numel() for p in frozen) * frozen_bytes / processes,
        "trainable_weights": trainable_bytes / processes,
        "buffers": sum(b.numel() * b.element_size() for b in model.buffers()),
        "gradients": trainable_bytes / processes,
        "optimizer_state": 2 * trainable_bytes / processes + 4 * len(trainable),
    }
    shape = RunShape(parts, config.micro_batch_size, config.seq_len, False, config.bf16 == "yes")
    plan = plan_memory(meta_model(read_moe_config(config.model), parts), processes, shape, sharded=True)
    for report in reports:
        for name, value in expected.items():
            assert report[name] == pytest.approx(value, rel=0.1), name
            assert report[name] == pytest.approx(getattr(plan, name), rel=0.1), name
        shards = report["expert_shards"]
        assert len(shards) == 2 * 2 * 3  # 2 tensors x (frozen, trainable) x 3 MoE layers
        for name, (local, placements) in shards.items():
            experts = 1 if ".frozen_" in name else 3
            rows = 2 * 96 if name.endswith("gate_up_proj") else 64
            assert local[:2] == [experts, rows // processes] and placements == ["S(1)"], name
    return reports


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
