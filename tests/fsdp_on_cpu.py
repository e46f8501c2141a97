"""``pdmoe.cpt`` under accelerate's FSDP on CPU processes (gloo), for the tests.

accelerate sets up FSDP only on accelerator devices: on CPU it picks MULTI_CPU, which is DDP, whatever
the config says. Launched by ``accelerate launch --config_file FSDP_CONFIG tests/fsdp_on_cpu.py ARGS``
(torchrun underneath), this script creates the gloo process group itself and has accelerate see the
processes as a multi-device set-up on the CPU device, so accelerate's own FSDP code runs unchanged.

With ``PDMOE_TEST_MEMORY_REPORT=DIR`` each process also writes ``DIR/rank-N.json`` right after its
first optimizer step (gradients not yet freed, optimizer state created): the bytes it holds of
parameters (frozen, trainable), buffers, gradients and optimizer state, its own part of every
sharded tensor, and the local shape of every expert tensor.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

import pdmoe.cpt.trainer as trainer
from pdmoe.cpt.__main__ import main
from pdmoe.layout import is_frozen_expert_parameter, is_trainable_expert_parameter


def _multi_device_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _bytes(tensors) -> int:
    """Bytes of this process's part of ``tensors``, each storage counted once."""
    storages = {}
    for tensor in tensors:
        local = _local(tensor)
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def _memory_report(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    params = dict(model.named_parameters())
    trainable = [p for p in params.values() if p.requires_grad]
    return {
        "frozen_weights": _bytes(p for p in params.values() if not p.requires_grad),
        "trainable_weights": _bytes(trainable),
        "buffers": _bytes(model.buffers()),
        "gradients": _bytes(p.grad for p in trainable if p.grad is not None),
        "optimizer_state": _bytes(v for p in trainable for v in optimizer.state.get(p, {}).values()),
        "frozen_dtypes": sorted({str(p.dtype) for p in params.values() if not p.requires_grad}),
        "expert_shards": {
            name: [list(_local(p).shape), [str(placement) for placement in p.placements]]
            for name, p in params.items()
            if is_frozen_expert_parameter(name) or is_trainable_expert_parameter(name)
        },
    }


def _report_memory(directory: Path) -> None:
    """Write the report after the first optimizer step of the run."""
    setup = trainer.setup

    def setup_then_watch(config):
        run = setup(config)
        optimizer = run.optimizer.optimizer  # torch's, inside accelerate's wrapper

        def report(*_):
            path = directory / f"rank-{dist.get_rank()}.json"
            if not path.exists():
                path.write_text(
                    json.dumps(_memory_report(run.accelerator.unwrap_model(run.model), optimizer))
                )

        optimizer.register_step_post_hook(report)
        return run

    trainer.setup = setup_then_watch


if __name__ == "__main__":
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    dist.init_process_group("gloo")
    PartialState._prepare_backend = _multi_device_on_cpu
    if "PDMOE_TEST_MEMORY_REPORT" in os.environ:
        _report_memory(Path(os.environ["PDMOE_TEST_MEMORY_REPORT"]))
    sys.exit(main(sys.argv[1:]))
