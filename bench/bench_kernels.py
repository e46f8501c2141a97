"""Expert-MLP kernels against transformers' experts implementations, in one run.

On CUDA (bf16): for each (H, F, E, k) and T, forward and forward+backward of ``pdmoe``, ``pdmoe-triton``,
``loop`` and ``grouped_mm`` (expert_impls.py says what each is), with ms, TFLOP/s and % of a dense 8192³
bf16 matmul measured in the same session in ``extra_info``; and decode (T = 1, 8, 32, forward) as GB/s of
active expert weights read, against the device's copy bandwidth, with and without CUDA-graph capture.
On CPU only the plain-PyTorch paths at a tiny size (the Triton interpreter would measure nothing
useful), so ``pytest --benchmark`` stays quick. Inputs are fresh random values (never zeros); each
timed step is synchronised.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from expert_impls import (
    Shape,
    active_weight_bytes,
    expert_flops,
    make_experts,
    own_kernels_only,
    random_inputs,
    run_impl,
)
from harness import CUDA, DEVICE, Row, record, sync
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from pdmoe.kernels import dispatch

DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = [(4096, 14336, 8, 2), (1536, 8960, 4, 2), (2048, 1408, 64, 8)] if CUDA else [(64, 128, 4, 2)]
TOKENS = [16384, 4096, 256] if CUDA else [256]
DECODE_TOKENS = [1, 8, 32]
IMPLS = ["pdmoe", "pdmoe-triton", "loop", "grouped_mm"] if CUDA else ["reference", "loop"]
ROUNDS = 10 if CUDA else 3


def _cuda_ms(fn, reps: int = 20) -> float:
    """Mean milliseconds of ``fn`` by CUDA events, after a warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@pytest.fixture(scope="module")
def device_peaks() -> dict[str, float]:
    """Dense bf16 matmul TFLOP/s and copy GB/s of this device, measured once per run."""
    if not CUDA:
        return {}
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    dense_tflops = 2 * 8192**3 / _cuda_ms(lambda: a @ b) / 1e9
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / _cuda_ms(lambda: dst.copy_(src)) / 1e6
    return {"dense_bf16_tflops": dense_tflops, "copy_gbs": copy_gbs}


_EXPERTS: dict[Shape, MixtralExperts] = {}


def _experts(shape: Shape) -> MixtralExperts:
    """The experts module of ``shape`` on the device (one shape's weights at a time)."""
    if shape not in _EXPERTS:
        _EXPERTS.clear()
        _EXPERTS[shape] = make_experts(shape, DEVICE, DTYPE)
    return _EXPERTS[shape]


def _inputs(T: int, shape: Shape):
    return random_inputs(T, shape, DEVICE, DTYPE)


def _label(shape) -> str:
    return "H{}-F{}-E{}-k{}".format(*shape)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=_label)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_experts_throughput(benchmark, device_peaks, impl, T, shape, mode):
    experts = _experts(shape)
    hidden, ids, weights = _inputs(T, shape)
    train = mode == "forward_backward"
    for p in experts.parameters():
        p.requires_grad_(train)
        p.grad = None
    hidden.requires_grad_(train)
    weights.requires_grad_(train)

    def step() -> None:
        if train:
            hidden.grad = weights.grad = experts.gate_up_proj.grad = experts.down_proj.grad = None
            run_impl(experts, impl, hidden, ids, weights).float().square().mean().backward()
        else:
            with torch.no_grad():
                run_impl(experts, impl, hidden, ids, weights)
        sync()

    with own_kernels_only() if impl == "pdmoe-triton" else contextlib.nullcontext():
        step()  # warm-up: Triton compiles, cuBLAS picks algorithms
        benchmark.group = f"experts {mode} {_label(shape)} T={T} ({'cuda bf16' if CUDA else 'cpu fp32'})"
        benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
    seconds = benchmark.stats.stats.median
    flops = expert_flops(T, shape, train)
    benchmark.extra_info.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12)
    rates = tuple(flops / t / 1e12 for t in benchmark.stats.stats.data)
    record(Row(benchmark.group, impl, rates, unit="TFLOP/s"))
    if impl == "pdmoe":
        benchmark.extra_info["grouped_mm_rules"] = {g.value: r for g, r in dispatch.GROUPED_MM_RULES.items()}
    if device_peaks:
        benchmark.extra_info.update(device_peaks)
        benchmark.extra_info["pct_of_dense_bf16"] = (
            100 * flops / seconds / 1e12 / device_peaks["dense_bf16_tflops"]
        )
    for p in experts.parameters():
        p.grad = None


@pytest.mark.skipif(not CUDA, reason="decode bandwidth is a GPU measurement")
@pytest.mark.parametrize("impl", ["pdmoe", "pdmoe+graph", "loop", "grouped_mm", "grouped_mm+graph"])
@pytest.mark.parametrize("T", DECODE_TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=_label)
def test_decode_bandwidth(benchmark, device_peaks, impl, T, shape):
    base, _, graphed = impl.partition("+")
    experts = _experts(shape)
    for p in experts.parameters():
        p.requires_grad_(False)
    hidden, ids, weights = _inputs(T, shape)

    def forward() -> torch.Tensor:
        return run_impl(experts, base, hidden, ids, weights)

    forward()
    if graphed:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                forward()
        except RuntimeError as err:  # e.g. a host sync inside the implementation
            pytest.skip(f"{base} cannot be captured: {err}")

        def step() -> None:
            graph.replay()
            torch.cuda.synchronize()
    else:

        def step() -> None:
            forward()
            torch.cuda.synchronize()

    step()
    benchmark.group = f"decode {_label(shape)} T={T} (cuda bf16)"
    benchmark.pedantic(step, rounds=50, iterations=1, warmup_rounds=5)
    seconds = benchmark.stats.stats.median
    weight_bytes = active_weight_bytes(experts, ids)
    gbs = weight_bytes / seconds / 1e9
    record(
        Row(
            benchmark.group,
            f"{impl} weights read",
            tuple(weight_bytes / t / 1e9 for t in benchmark.stats.stats.data),
            unit="GB/s",
        )
    )
    benchmark.extra_info.update(
        ms=seconds * 1e3,
        weight_gb_per_s=gbs,
        pct_of_copy_bw=100 * gbs / device_peaks["copy_gbs"],
        **device_peaks,
    )
