"""Compile every Triton kernel for Hopper (sm_90) with the shipped H100 configs, without a GPU.

The interpreter runs the kernels' semantics but not Triton's code generation; this catches what only
the compiler sees (types through if/else, layouts, wgmma/pipelining, shared memory over the 227 KiB
an H100 block may use). Runs as a subprocess because the test process has TRITON_INTERPRET=1.
Run directly (``python tests/test_kernels_compile.py --all``) to see the shared memory of every variant
at every token bucket (the test compiles a subset to stay quick on a cold cache).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HOPPER_SMEM_BYTES = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200
DEVICE = "NVIDIA H100 80GB HBM3"


def _variants():
    """(config kernel name, jit function, stride args equal to 1, constexpr flags) as moe_op launches them."""
    from pdmoe.kernels import grouped_gemm as gg

    down_grad = {"A_GATHER": True, "A_SCALE": True, "B_GATHER": False, "B_SWIGLU": True}
    gate_up_grad = {"A_GATHER": False, "A_SCALE": False, "B_GATHER": True, "B_SWIGLU": False}
    unit_wg = ("stride_am", "stride_bn", "stride_on")
    return [
        ("gate_up_fwd", gg._gate_up_fwd_kernel, ("stride_xh", "stride_wk"), {"SAVE_PREACT": True}),
        ("scatter_gemm", gg._scatter_gemm_kernel, ("stride_ak", "stride_wk"), {"HAS_SCALE": True}),
        ("scatter_gemm", gg._scatter_gemm_kernel, ("stride_ak", "stride_wn"), {"HAS_SCALE": False}),
        ("act_bwd", gg._act_bwd_kernel, ("stride_dh", "stride_wf"), {"NEED_DSCALE": True}),
        ("weight_grad", gg._weight_grad_kernel, unit_wg, down_grad),
        ("weight_grad", gg._weight_grad_kernel, unit_wg, gate_up_grad),
    ]


def _compile(fn, dtype: str, ones, flags, cfg) -> int:
    """Shared memory (bytes) of ``fn`` compiled for sm_90 with Triton's usual launch specialisations."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    const = {**flags, **blocks, **dict.fromkeys(ones, 1)}
    if "BLOCK_E" in fn.arg_names:
        const["BLOCK_E"] = 64
    if "PRECISION" in fn.arg_names:
        const["PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
    index_ptrs = {"sorted_slots_ptr", "offsets_ptr"}
    fp32_ptrs = {"scale_ptr", "dscale_part_ptr"}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*i32" if name in index_ptrs else "*fp32" if name in fp32_ptrs else f"*{dtype}"
        else:
            signature[name] = "i32"
        if name.endswith("_ptr") or name.startswith("stride") or name in ("H", "F", "N", "K", "M"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(
        fn=fn,
        signature=signature,
        attrs=attrs,
        constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
    )
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).metadata.shared


def main(every_bucket: bool) -> int:
    """Compile the variants in bf16 and fp32 at every token bucket with ``every_bucket``, else only bf16 at
    the training bucket (largest tiles and shared memory; the test's subset, quick on a cold cache)."""
    import torch

    from pdmoe.kernels.tuning import config_for

    failures = 0
    dtypes = (
        (("bf16", torch.bfloat16), ("fp32", torch.float32)) if every_bucket else (("bf16", torch.bfloat16),)
    )
    for dtype, torch_dtype in dtypes:
        for kernel, fn, ones, flags in _variants():
            for n_tokens in (16384, 256, 64, 1) if every_bucket else (16384,):
                cfg = config_for(DEVICE, kernel, n_tokens, torch_dtype)
                label = f"{fn.__name__} {flags} {dtype} T={n_tokens}"
                try:
                    smem = _compile(fn, dtype, ones, flags, cfg)
                except Exception as err:  # report every variant, then fail
                    print(f"FAIL {label}: {err}")
                    failures += 1
                    continue
                over = smem > HOPPER_SMEM_BYTES
                failures += over
                print(f"{'FAIL' if over else 'ok  '} {label}: {smem} B shared")
    return 1 if failures else 0


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]


if __name__ == "__main__":
    sys.exit(main(every_bucket="--all" in sys.argv))
