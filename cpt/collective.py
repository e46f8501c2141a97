"""Decisions all processes take together, so that none waits forever for one that stopped."""

from __future__ import annotations

from collections.abc import Callable

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


def together(
    accelerator: Accelerator, action: Callable[[], None], *, elsewhere: Exception, main_only: bool = False
) -> None:
    """Run ``action`` on every process (or on the main one only); when it fails anywhere, every
    process raises: its own exception, or ``elsewhere`` where it succeeded."""
    error: Exception | None = None
    if accelerator.is_main_process or not main_only:
        try:
            action()
        except Exception as raised:
            error = raised
    if any_process(accelerator, error is not None):
        raise error or elsewhere
