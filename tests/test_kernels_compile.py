"""The Hopper compile gate: every Triton kernel built for sm_90a with the shipped tables, no GPU needed.

The interpreter checks what the kernels compute; this checks what the compiler makes of them:
registers and spills (ptxas), shared memory, CTAs per SM, the tensor-core instruction (wgmma or
mma.sync, from the PTX) and how many shared-memory buffers each K-loop keeps (from the TTGIR).

Kernels are captured exactly as ``moe_mlp`` launches them: the op's forward and backward run on meta
tensors at real model shapes under a stand-in Hopper driver (inference; training with whole weights,
with the frozen pair, and with ``torch._grouped_mm`` dispatch), and a Triton JIT hook records every
launch's specialisation (signature, constexprs, alignment, num_warps, num_stages) instead of compiling
or running it. Each distinct launch is then compiled with ``triton.compile`` for ``GPUTarget("cuda", 90)``.

    python tests/test_kernels_compile.py --report   # every variant: both tables, all shapes and sizes
    python tests/test_kernels_compile.py            # the test's subset; exit status 1 on a violation
    (--jobs N compiles in N forked processes)

Violations, for launches at training sizes (T > 64): a spill; a bf16/tf32 GEMM without wgmma; a K-loop
with fewer than num_stages - 1 buffers, or (bf16) with an operand that passes through registers
(column "bufs" marks it "r"; TF32 wgmma needs K-major operands, so Triton transposes MN-major ones that
way); fewer CTAs per SM than the table's ``ctas_per_sm``. At every size: more shared memory than a
block may have. The test runs the subset (bf16, the largest shape,
T = 16384: the launches a training step makes) in a subprocess, since the test process interprets.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import pytest

DEVICES = ("NVIDIA H100 80GB HBM3", "NVIDIA H200")
SHAPES = ((4096, 14336, 8, 2), (1536, 8960, 4, 2), (2048, 1408, 64, 8))  # (H, F, E, k)
TOKENS = (1, 32, 256, 16384)
REPORT = {"devices": DEVICES, "shapes": SHAPES, "tokens": TOKENS, "dtypes": ("bf16", "tf32", "fp32")}
SUBSET = {"devices": DEVICES[:1], "shapes": SHAPES[:1], "tokens": (16384,), "dtypes": ("bf16",)}
DECODE_MAX_TOKENS = 64

# Hopper (sm_90) limits; the H100 SXM and the H200 both have 132 SMs.
HOPPER_SMS = 132
SM_REGISTERS = 65536
SM_SHARED = 233472  # 228 KiB, of which 1 KiB is reserved per CTA
SM_THREADS = 2048
SM_CTAS = 32
BLOCK_SHARED_MAX = 232448


@dataclass(frozen=True)
class Launch:
    """One distinct kernel specialisation, as a launch would compile it."""

    kernel: str
    constexprs: tuple
    signature: tuple
    attrs: tuple
    num_warps: int
    num_stages: int


@dataclass
class Captured:
    func: object
    compile: dict
    tokens: set = field(default_factory=set)  # the T of every scenario that launched it
    ctas_per_sm: set = field(default_factory=set)  # what the table promised for those launches


@dataclass
class Compiled:
    registers: int
    spill_bytes: int
    shared: int
    ctas_per_sm: int
    mma: str
    kloop_buffers: int | None  # None: no K-loop with a dot
    operand_through_registers: bool
    mma_wait_pendings: int | None


class _HopperDriver:
    """Just enough of a Triton driver for the JIT to specialise launches for sm_90 without a GPU."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise AttributeError(f"the stand-in Hopper driver has no {name}")


@contextlib.contextmanager
def _capturing(device_name: str, scenario: dict):
    """Record launches instead of compiling them, with the tables and SM count of ``device_name``;
    ``scenario["tokens"]`` and ``scenario["ctas"]`` are attached to what is recorded."""
    from triton import knobs
    from triton.runtime import driver

    from pdmoe.kernels import tuning

    launches: dict[Launch, Captured] = {}

    def hook(*, fn, compile, **_):
        func = fn.jit_function
        names = [p.name for p in func.params]
        launch = Launch(
            kernel=func.fn.__name__,
            constexprs=tuple(sorted((names[path[0]], repr(v)) for path, v in compile["constants"].items())),
            signature=tuple(compile["signature"].items()),
            attrs=tuple(sorted((str(k), repr(v)) for k, v in compile["configs"][0].items())),
            num_warps=compile["num_warps"],
            num_stages=compile["num_stages"],
        )
        captured = launches.setdefault(launch, Captured(func, compile))
        captured.tokens.add(scenario["tokens"])
        if scenario["ctas"] is not None:
            captured.ctas_per_sm.add(scenario["ctas"])
        return True  # skip compiling and launching

    def programs(cfg, device):
        scenario["ctas"] = cfg.ctas_per_sm  # read by the hook of the launch that follows
        return HOPPER_SMS * cfg.ctas_per_sm

    saved = knobs.runtime.jit_cache_hook, tuning.current_device, tuning.programs
    knobs.runtime.jit_cache_hook = hook
    driver.set_active(_HopperDriver())
    tuning.current_device = lambda device: tuning.DeviceInfo(device_name, HOPPER_SMS, True)
    tuning.programs = programs
    try:
        yield launches
    finally:
        knobs.runtime.jit_cache_hook, tuning.current_device, tuning.programs = saved
        with contextlib.suppress(RuntimeError):  # no CUDA driver to go back to
            driver.reset_active()


def _scenario(shape, n_tokens: int, dtype, train: bool, frozen: bool) -> None:
    """The op's forward (and its backward when ``train``) on meta tensors, as ``moe_mlp`` runs them."""
    import torch

    from pdmoe.kernels import moe_op

    H, F, E, k = shape
    meta = {"device": "meta", "dtype": dtype}
    x = torch.empty(n_tokens, H, **meta)
    gate_up, down = torch.empty(E, 2 * F, H, **meta), torch.empty(E, H, F, **meta)
    weights = torch.empty(n_tokens, k, **meta)
    parts = (gate_up[:1], gate_up[1:], down[:1], down[1:]) if frozen else (gate_up, None, down, None)
    ids = torch.empty(n_tokens, k, dtype=torch.int64, device="meta")
    _, preact, *perm = moe_op.forward(x, *parts, weights, ids, train)
    if train:
        needs = [True, not frozen, frozen, not frozen, frozen, True]
        moe_op.backward(torch.empty_like(x), x, *parts, weights, preact, *perm, needs)


def capture(device_name: str, shapes, tokens, dtypes) -> dict[Launch, Captured]:
    """Every distinct launch of inference, and of training with whole weights and with the frozen pair."""
    import torch

    from pdmoe.kernels import moe_op

    torch_dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}
    precision = torch.get_float32_matmul_precision()
    scenario = {"tokens": 0, "ctas": None}
    grouped_mm = moe_op.use_grouped_mm
    moe_op.use_grouped_mm = lambda *args: False  # pdmoe's own kernel for every GEMM, unless said otherwise
    try:
        with _capturing(device_name, scenario) as launches:
            for dtype in dtypes:
                torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
                for shape in shapes:
                    for n_tokens in tokens:
                        scenario.update(tokens=n_tokens, ctas=None)
                        _scenario(shape, n_tokens, torch_dtypes[dtype], train=False, frozen=False)
                        if n_tokens > DECODE_MAX_TOKENS:
                            _scenario(shape, n_tokens, torch_dtypes[dtype], train=True, frozen=False)
                            _scenario(shape, n_tokens, torch_dtypes[dtype], train=True, frozen=True)
                            if dtype == "bf16":  # what runs beside torch._grouped_mm
                                moe_op.use_grouped_mm = lambda *args: True
                                _scenario(shape, n_tokens, torch_dtypes[dtype], train=True, frozen=False)
                                moe_op.use_grouped_mm = lambda *args: False
    finally:
        torch.set_float32_matmul_precision(precision)
        moe_op.use_grouped_mm = grouped_mm
    return launches


def _ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) from ptxas -v, run as Triton runs it for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        args = ["-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src, "-o", src + ".o"]
        log = subprocess.run([get_ptxas(90).path, *args], capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def _kloop(ttgir: str) -> tuple[int | None, bool, int | None]:
    """For the K-loops (innermost ``scf.for`` loops with a dot; a persistent kernel's tile loop is not
    one): the fewest shared-memory buffers their operands are prefetched into ([stages, rows, cols]
    allocations made before the loop), whether an operand passes through registers inside a loop (stored
    to shared memory there by ``local_alloc %value``: computed, or transposed for TF32), and the fewest
    wgmma wait pendings."""
    lines = ttgir.splitlines()
    float_tile = r"x(?:bf16|f16|f32)"
    staged = [
        int(m.group(1))
        for m in re.finditer(
            rf"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+{float_tile}", ttgir
        )
    ]
    loops, through_registers, pendings = 0, False, []
    for start, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        depth, end = 0, start
        for end in range(start, len(lines)):
            depth += lines[end].count("{") - lines[end].count("}")
            if depth <= 0 and end > start:
                break
        body = "\n".join(lines[start + 1 : end + 1])
        if "scf.for" in body or not ("warp_group_dot " in body or "tt.dot " in body):
            continue
        loops += 1
        through_registers |= bool(re.search(rf"ttg\.local_alloc %\S+ : \(tensor<[^>]*{float_tile},", body))
        pendings += [int(p) for p in re.findall(r"warp_group_dot_wait .*pendings = (\d+)", body)]
    if not loops:
        return None, False, None
    return (min(staged) if staged else 1), through_registers, (min(pendings) if pendings else None)


def _ctas_per_sm(registers: int, shared: int, num_warps: int) -> int:
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_registers = SM_REGISTERS // (per_warp * num_warps)
    by_shared = SM_SHARED // (shared + 1024)
    return min(by_registers, by_shared, SM_THREADS // (32 * num_warps), SM_CTAS)


def compile_launch(captured: Captured) -> Compiled:
    import triton
    from triton.compiler import ASTSource

    spec = captured.compile
    src = ASTSource(
        fn=captured.func, signature=spec["signature"], constexprs=spec["constants"], attrs=spec["configs"][0]
    )
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    kernel = triton.compile(src, target=_HopperDriver().target, options=options)
    ptx = kernel.asm["ptx"]
    registers, spills = _ptxas_report(ptx)
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    buffers, through_registers, pendings = _kloop(kernel.asm["ttgir"])
    shared = kernel.metadata.shared
    ctas = _ctas_per_sm(registers, shared, spec["num_warps"])
    return Compiled(registers, spills, shared, ctas, mma, buffers, through_registers, pendings)


def _compile_or_error(captured: Captured) -> Compiled | str:
    try:
        return compile_launch(captured)
    except Exception as err:  # reported, and counted as a failure
        return f"{type(err).__name__}: {str(err)[:300]}"


_POOL_ITEMS: list[Captured] = []


def _compile_item(index: int) -> Compiled | str:
    return _compile_or_error(_POOL_ITEMS[index])


def compile_all(items: list[Captured], jobs: int) -> list[Compiled | str]:
    """Compile every captured launch, in ``jobs`` forked processes when more than one."""
    if jobs <= 1:
        return [_compile_or_error(item) for item in items]
    import multiprocessing

    _POOL_ITEMS[:] = items
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_item, range(len(items)))


def _dtype(launch: Launch) -> str:
    """bf16, tf32 (fp32 data on TF32 tensor cores), fp32 (IEEE products) or int (index kernels)."""
    if any("bf16" in t for _, t in launch.signature):
        return "bf16"
    if not any("fp32" in t for _, t in launch.signature):
        return "int"
    return "tf32" if dict(launch.constexprs).get("PRECISION") == "'tf32'" else "fp32"


def _flags(launch: Launch) -> str:
    shown = [f"{k}={v.strip(chr(39))}" for k, v in launch.constexprs if k.isupper() and k != "PRECISION"]
    return " ".join(shown)


def _buffers(result: Compiled) -> str:
    """K-loop buffers, with an "r" where an operand passes through registers in the loop."""
    if result.kloop_buffers is None:
        return "-"
    return f"{result.kloop_buffers}{'r' if result.operand_through_registers else ''}"


def violations(launch: Launch, captured: Captured, result: Compiled) -> list[str]:
    found = []
    if result.shared > BLOCK_SHARED_MAX:
        found.append(f"{result.shared} B shared > {BLOCK_SHARED_MAX}")
    if max(captured.tokens) <= DECODE_MAX_TOKENS:
        return found
    if result.spill_bytes:
        found.append(f"{result.spill_bytes} B spilled")
    if result.kloop_buffers is not None:
        if _dtype(launch) in ("bf16", "tf32") and result.mma != "wgmma":
            found.append(f"{result.mma} instead of wgmma")
        if result.kloop_buffers < launch.num_stages - 1:
            found.append(f"K-loop keeps {result.kloop_buffers} of {launch.num_stages} buffers")
        if _dtype(launch) == "bf16" and result.operand_through_registers:
            found.append("a K-loop operand passes through registers")
    promised = max(captured.ctas_per_sm, default=0)
    if promised > result.ctas_per_sm:
        found.append(f"table says {promised} CTAs/SM, {result.ctas_per_sm} fit")
    return found


def main(scope: dict, jobs: int = 1) -> int:
    header = (
        f"{'kernel':22} {'dtype':5} {'T':>11} {'w':>2} {'s':>2} {'regs':>4} {'spill':>5} {'smem':>6} "
        f"{'cta/sm':>6} {'mma':8} {'bufs':>4} {'pend':>4}  constexprs"
    )
    failures = 0
    results: dict[Launch, Compiled | str] = {}  # the H200 table is the H100 one: compile each launch once
    for device in scope["devices"]:
        launches = capture(device, scope["shapes"], scope["tokens"], scope["dtypes"])
        new = [launch for launch in launches if launch not in results]
        results.update(zip(new, compile_all([launches[launch] for launch in new], jobs), strict=True))
        print(f"\n# {device}: {len(launches)} distinct launches (identical rows merged)\n{header}")
        rows: dict[str, int] = {}
        for launch, captured in sorted(
            launches.items(), key=lambda kv: (kv[0].kernel, _dtype(kv[0]), _flags(kv[0]))
        ):
            result = results[launch]
            if isinstance(result, str):
                rows[f"FAIL {launch.kernel} {_flags(launch)}: {result}"] = 1
                failures += 1
                continue
            bad = violations(launch, captured, result)
            failures += bool(bad)
            sizes = (
                f"{min(captured.tokens)}-{max(captured.tokens)}"
                if len(captured.tokens) > 1
                else str(*captured.tokens)
            )
            row = (
                f"{launch.kernel:22} {_dtype(launch):5} {sizes:>11} {launch.num_warps:>2} {launch.num_stages:>2} "
                f"{result.registers:>4} {result.spill_bytes:>5} {result.shared:>6} {result.ctas_per_sm:>6} "
                f"{result.mma:8} {_buffers(result):>4} "
                f"{result.mma_wait_pendings if result.mma_wait_pendings is not None else '-':>4}  {_flags(launch)}"
                + ("   <-- " + "; ".join(bad) if bad else "")
            )
            rows[row] = rows.get(row, 0) + 1
        for row in rows:
            print(row, flush=True)
    print(f"\n{failures} launch(es) with violations" if failures else "\nno violations")
    return 1 if failures else 0


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]


if __name__ == "__main__":
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 1
    sys.exit(main(REPORT if "--report" in sys.argv else SUBSET, jobs))
