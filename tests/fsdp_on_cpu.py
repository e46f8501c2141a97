"""``pdmoe.cpt`` under accelerate's FSDP on CPU processes (gloo), for the tests.

accelerate sets up FSDP only on accelerator devices: on CPU it picks MULTI_CPU, which is DDP, whatever
the config says. Launched by ``accelerate launch --config_file FSDP_CONFIG tests/fsdp_on_cpu.py ARGS``
(torchrun underneath), this script creates the gloo process group itself and has accelerate see the
processes as a multi-device set-up on the CPU device, so accelerate's own FSDP code runs unchanged.

With ``PDMOE_TEST_STORAGE_REPORT=DIR`` each process also writes ``DIR/rank-N.json`` before its first
step: the bytes of expert storage it holds (frozen buffers and its trainable shards).
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
from pdmoe.layout import is_frozen_expert_buffer, is_trainable_expert_parameter


def _multi_device_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


def _storage_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.untyped_storage().nbytes()


def _report_storage(directory: Path) -> None:
    step = trainer.train_step

    def report_then_step(run):
        path = directory / f"rank-{dist.get_rank()}.json"
        if not path.exists():
            model = run.accelerator.unwrap_model(run.model)
            frozen = [b for n, b in model.named_buffers() if is_frozen_expert_buffer(n)]
            trainable = [p for n, p in model.named_parameters() if is_trainable_expert_parameter(n)]
            report = {
                "frozen_storage_bytes": sum(_storage_bytes(b) for b in frozen),
                "frozen_bytes": sum(b.numel() * b.element_size() for b in frozen),
                "trainable_storage_bytes": sum(_storage_bytes(p) for p in trainable),
                "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
                "trainable_sharded": all(isinstance(p, DTensor) for p in trainable),
            }
            path.write_text(json.dumps(report))
        return step(run)

    trainer.train_step = report_then_step


if __name__ == "__main__":
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    dist.init_process_group("gloo")
    PartialState._prepare_backend = _multi_device_on_cpu
    if "PDMOE_TEST_STORAGE_REPORT" in os.environ:
        _report_storage(Path(os.environ["PDMOE_TEST_STORAGE_REPORT"]))
    sys.exit(main(sys.argv[1:]))
