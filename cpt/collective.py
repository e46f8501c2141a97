"""Decisions all processes take together, so that none waits forever for one that stopped."""

from __future__ import annotations

import torch
from accelerate import Accelerator


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds on any process (every process calls this).

    Ends with a barrier: gloo's worker thread releases the reduced tensor (a Python object) after the
    reduction returns, and if that happens while the run tears the process group down (it often
    ends or raises right after such a decision), the two threads deadlock on the GIL.
    """
    count = accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), "sum")
    result = bool(count.item())
    accelerator.wait_for_everyone()
    return result
