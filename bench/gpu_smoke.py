"""First contact with a device: every kernel of the expert pipeline launched once, each on its own.

    python bench/gpu_smoke.py --out DIR

Each step (permutation, the two row gathers, the gate/up GEMM, the down GEMM, its split-K decode
form, the combine, act_bwd, the d(hidden) GEMM, the weight-gradient GEMM, the whole differentiable
``moe_mlp``) runs in its own ``try``: its first call (compile included) and a second call are timed,
its output is compared with a float64 PyTorch computation of the same function, and a failure leaves
its traceback in ``DIR/<step>.txt`` while the later steps go on from the reference result. The
fallback paths (the PyTorch reference loop and ``torch._grouped_mm``) follow, so numbers come back
even when a Triton kernel does not. ``DIR/smoke.json`` holds one record per step, written as it goes.

On CUDA the shapes are small and bf16; elsewhere the kernels run in Triton's interpreter in fp32.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch.nn.functional as F

from pdmoe.kernels import dispatch, moe_mlp, moe_mlp_reference
from pdmoe.kernels import grouped_gemm as gg
from pdmoe.kernels.permutation import permute, permute_reference
from pdmoe.kernels.rows import combine_rows, gather_rows
from pdmoe.kernels.testing import random_moe_inputs
from pdmoe.kernels.tuning import Gemm, get_config

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}  # relative to the reference's largest value
# (T, H, F, E, k): a training-like step and a decode step long enough in F for split-K
TRAIN_SHAPE = (300, 256, 192, 8, 2) if CUDA else (40, 64, 48, 4, 2)
DECODE_SHAPE = (4, 512, 2048, 8, 2) if CUDA else (4, 64, 256, 4, 2)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Smoke:
    """Runs steps, keeps one record per step in ``out/smoke.json`` (rewritten after every step)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.records: list[dict] = []

    def step(self, name: str, kernel: Callable[[], object], reference: Callable[[], object]) -> object:
        """``kernel()``'s result where it ran and matched; otherwise ``reference()``'s, so later steps
        still get valid inputs. Both return a tensor or a tuple of tensors (None entries ignored)."""
        record: dict = {"step": name}
        want = reference()
        try:
            start = time.perf_counter()
            got = kernel()
            _sync()
            record["first_call_s"] = round(time.perf_counter() - start, 3)
            start = time.perf_counter()
            kernel()
            _sync()
            record["second_call_s"] = round(time.perf_counter() - start, 4)
            record["max_rel_error"] = _max_rel_error(got, want)
            record["ok"] = record["max_rel_error"] <= TOLERANCE[DTYPE]
        except Exception:
            record.update(ok=False, error=traceback.format_exc(limit=-8).strip().splitlines()[-1])
            (self.out / f"{name}.txt").write_text(traceback.format_exc())
            got = want
        self._save(record)
        return got if record["ok"] else want

    def _save(self, record: dict) -> None:
        self.records.append(record)
        (self.out / "smoke.json").write_text(json.dumps(self.records, indent=1))
        status = "ok  " if record["ok"] else "FAIL"
        detail = record.get("error") or f"rel err {record['max_rel_error']:.1e}"
        timing = (
            f"{record.get('first_call_s', float('nan')):7.2f} s first" if "first_call_s" in record else ""
        )
        print(f"{status} {record['step']:<22} {timing:>16}  {detail}", flush=True)


def _tensors(value: object) -> list[torch.Tensor]:
    items = value if isinstance(value, tuple | list) else (value,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def _max_rel_error(got: object, want: object) -> float:
    worst = 0.0
    for g, w in zip(_tensors(got), _tensors(want), strict=True):
        if g.shape != w.shape:
            raise ValueError(f"shape {tuple(g.shape)}, expected {tuple(w.shape)}")
        if not g.is_floating_point():
            worst = max(worst, float((g != w).any()))
            continue
        scale = w.double().abs().max().item() or 1.0
        err = (g.double() - w.double()).abs().max().item() / scale
        worst = max(worst, err if err == err else float("inf"))  # NaN never passes
    return worst


def _per_expert(rows: torch.Tensor, offsets: torch.Tensor, fn: Callable[[int, torch.Tensor], torch.Tensor]):
    """Concatenation of ``fn(e, rows of expert e)`` over experts, in sorted row order (float64)."""
    bounds = offsets.tolist()
    return torch.cat([fn(e, rows[bounds[e] : bounds[e + 1]].double()) for e in range(len(bounds) - 1)])


def _per_expert_outer(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[E, M, N]: Σ over each expert's sorted rows of a[r]^T b[r] (a weight gradient)."""
    bounds = offsets.tolist()
    return torch.stack([a[s:e].double().T @ b[s:e].double() for s, e in itertools.pairwise(bounds)]).to(DTYPE)


def run_pipeline(smoke: Smoke, shape: tuple[int, int, int, int, int], decode: bool) -> None:
    """Forward and backward of the expert MLP, one kernel per step."""
    T, H, Fd, E, k = shape
    x, gate_up, down, weights, ids = random_moe_inputs(T, H, Fd, E, k, dtype=DTYPE, device=DEVICE, seed=T)
    tag = "decode" if decode else "train"
    ref = permute_reference(ids, E)
    perm = smoke.step(f"{tag}.permute", lambda: permute(ids, E), lambda: ref)
    off = ref.offsets
    slots = ref.sorted_slots.long()
    scale = weights.reshape(-1)

    x_sorted = smoke.step(
        f"{tag}.gather_hidden",
        lambda: gather_rows(x, perm.sorted_slots, perm.offsets, k),
        lambda: x[slots // k],
    )

    def gate_up_ref():
        pre = _per_expert(x_sorted, off, lambda e, r: r @ gate_up[e].double().T)
        g, u = pre.chunk(2, dim=1)
        return (F.silu(g) * u).to(DTYPE), pre.to(DTYPE)

    cfg = get_config(Gemm.GATE_UP_FWD, T, DEVICE, DTYPE)
    h, preact = smoke.step(
        f"{tag}.gate_up_fwd",
        lambda: gg.gate_up_fwd(x, gate_up, gate_up, E, E, perm, k, save_preact=True, cfg=cfg),
        gate_up_ref,
    )

    def down_ref():
        return (scale[slots].double()[:, None] * _per_expert(h, off, lambda e, r: r @ down[e].double().T)).to(
            DTYPE
        )

    cfg = get_config(Gemm.DOWN_FWD, T, DEVICE, DTYPE)
    n_split = 2 if decode else 1
    rows = smoke.step(
        f"{tag}.down_fwd" + ("_split_k" if decode else ""),
        lambda: (
            gg.grouped_gemm(
                h, down, down, E, E, transpose_w=False, scale=scale, perm=perm, cfg=cfg, n_split=n_split
            )
            .sum(0)
            .to(DTYPE)
            if n_split > 1
            else gg.grouped_gemm(h, down, down, E, E, transpose_w=False, scale=scale, perm=perm, cfg=cfg)
        ),
        down_ref,
    )
    smoke.step(
        f"{tag}.combine",
        lambda: combine_rows(rows, perm.slot_rows, T, k, DTYPE),
        lambda: rows.double()[ref.slot_rows.long()].view(T, k, H).sum(1).to(DTYPE),
    )
    if decode:
        return

    dy = torch.randn(T, H, device=DEVICE, dtype=DTYPE)
    dy_sorted = smoke.step(
        "train.gather_grad",
        lambda: gather_rows(dy, perm.sorted_slots, perm.offsets, k),
        lambda: dy[slots // k],
    )

    def act_bwd_ref():
        G = _per_expert(dy_sorted, off, lambda e, r: r @ down[e].double())
        g, u = preact.double().chunk(2, dim=1)
        s = scale[slots].double()[:, None]
        dh = s * G
        sig = torch.sigmoid(g)
        dg = dh * u * sig * (1 + g * (1 - sig))
        return (
            torch.cat([dg, dh * F.silu(g)], 1).to(DTYPE),
            (G * F.silu(g) * u).sum(1).float(),
            (s * h.double()).to(DTYPE),
        )

    cfg = get_config(Gemm.ACT_BWD, T, DEVICE, DTYPE)
    dpreact, _dscale, y1s = smoke.step(
        "train.act_bwd",
        lambda: gg.act_bwd(
            dy_sorted,
            down,
            down,
            E,
            E,
            scale,
            preact,
            perm,
            need_dpreact=True,
            need_dscale=True,
            need_y1s=True,
            cfg=cfg,
        ),
        act_bwd_ref,
    )
    cfg = get_config(Gemm.INPUT_GRAD, T, DEVICE, DTYPE)
    smoke.step(
        "train.input_grad",
        lambda: gg.grouped_gemm(
            dpreact, gate_up, gate_up, E, E, transpose_w=True, scale=None, perm=perm, cfg=cfg
        ),
        lambda: _per_expert(dpreact, off, lambda e, r: r @ gate_up[e].double()).to(DTYPE),
    )
    cfg = get_config(Gemm.WEIGHT_GRAD, T, DEVICE, DTYPE)
    smoke.step(
        "train.weight_grad",
        lambda: gg.weight_grad(dy_sorted, y1s, 0, E, perm, out_dtype=DTYPE, cfg=cfg),
        lambda: _per_expert_outer(dy_sorted, y1s, off),
    )

    def fwd_bwd(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, gate_up, down, weights)]
        y = fn(*leaves, ids)
        y.backward(dy.to(dtype))
        return (y.detach(), *(t.grad for t in leaves))

    smoke.step(
        "train.moe_mlp_fwd_bwd",
        lambda: fwd_bwd(moe_mlp, DTYPE),
        lambda: fwd_bwd(moe_mlp_reference, torch.float64),
    )


def run_fallbacks(smoke: Smoke) -> None:
    """The paths that serve when a Triton kernel does not: the PyTorch reference and torch._grouped_mm."""
    T, H, Fd, E, k = TRAIN_SHAPE
    x, gate_up, down, weights, ids = random_moe_inputs(T, H, Fd, E, k, dtype=DTYPE, device=DEVICE, seed=1)
    smoke.step(
        "fallback.reference_loop",
        lambda: moe_mlp_reference(x, gate_up, down, weights, ids),
        lambda: moe_mlp_reference(x.double(), gate_up.double(), down.double(), weights.double(), ids).to(
            DTYPE
        ),
    )
    ref = permute_reference(ids, E)
    a = torch.randn(ids.numel(), 2 * Fd, device=DEVICE, dtype=DTYPE)
    smoke.step(
        "fallback.grouped_mm_input_grad",
        lambda: dispatch.input_grad_grouped_mm(a, gate_up, ref.offsets),
        lambda: _per_expert(a, ref.offsets, lambda e, r: r @ gate_up[e].double()).to(DTYPE),
    )
    b = torch.randn(ids.numel(), H, device=DEVICE, dtype=DTYPE)
    smoke.step(
        "fallback.grouped_mm_weight_grad",
        lambda: dispatch.weight_grad_grouped_mm(a, b, ref.offsets),
        lambda: _per_expert_outer(a, b, ref.offsets),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True, help="folder for smoke.json and tracebacks")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(out)
    print(f"device {DEVICE} ({torch.cuda.get_device_name() if CUDA else 'Triton interpreter'}), {DTYPE}")
    run_pipeline(smoke, TRAIN_SHAPE, decode=False)
    run_pipeline(smoke, DECODE_SHAPE, decode=True)
    run_fallbacks(smoke)
    failed = [r["step"] for r in smoke.records if not r["ok"]]
    print(
        f"{len(smoke.records) - len(failed)} of {len(smoke.records)} steps ok"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
