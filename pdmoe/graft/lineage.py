"""Is CPT a descendant of this BASE? Checked on the tensors a pdmoe CPT leaves untouched.

pdmoe's CPT trains only the new experts and the routers: every shared tensor (attention, norms,
embeddings, lm_head) and the original experts stay BASE's, bit for bit (in CPT's dtype). The graft
reads both anyway, so comparing them costs no extra read. A difference means the wrong BASE (a
sibling of the same shape, or BASE and INSTRUCT swapped) or a CPT that trained more than pdmoe's
default; grafting would then break the promise that the result's shared weights and original
experts are INSTRUCT's. It is refused unless ``allow_modified_base`` says the CPT did train them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmoe.errors import Option, Problem, TensorValueError
from pdmoe.graft.planner import GraftRule, Piece, RowSource, TensorPlan

ALLOW_MODIFIED_BASE = Option("allow_modified_base", True)


@dataclass(frozen=True)
class LineageCheck:
    """Which output rows must find CPT equal to BASE: ``frozen_experts`` leading experts of every
    fused expert tensor, and the BASE rows of every shared tensor."""

    frozen_experts: int

    def applies(self, plan: TensorPlan, expert: int, piece: Piece) -> bool:
        if piece.source is not RowSource.DELTA:
            return False
        if plan.rule is GraftRule.SHARED_DELTA:
            return True
        return plan.rule is GraftRule.EXPERT_DELTA and expert < self.frozen_experts

    def compare(
        self, plan: TensorPlan, expert: int, piece: Piece, rows: range, cpt: torch.Tensor, base: torch.Tensor
    ) -> None:
        """Refuse when CPT's ``rows`` of ``plan`` (of ``expert``) are not BASE's (``piece.dense``)."""
        if torch.equal(cpt, base.to(cpt.dtype)):
            return
        largest = (cpt.double() - base.double()).abs().max().item()
        where = f"expert {expert} of {plan.out.name}" if plan.experts else plan.out.name
        source = "" if piece.dense == plan.out.name else f" (BASE's {piece.dense})"
        raise TensorValueError(
            "CPT is not a descendant of BASE: {where}, rows {first}..{last}, differs from BASE{source} by up "
            "to {largest:.3g}, but pdmoe's CPT leaves shared weights and original experts untouched. Check "
            "{base} (is it the model CPT was upcycled from? are {base} and {instruct} swapped?). If CPT also "
            "trained these tensors, pass {allow}: the graft is then the plain sum CPT + SCALE * (INSTRUCT - "
            "BASE), and the result's shared weights are not INSTRUCT's",
            problem=Problem.REFUSED,
            where=where,
            first=rows.start,
            last=rows.stop - 1,
            source=source,
            largest=largest,
            base=Option("base"),
            instruct=Option("instruct"),
            allow=ALLOW_MODIFIED_BASE,
        )
