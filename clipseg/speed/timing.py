"""Timing and the machine's limits: the clock (wall or CPU time), variants timed interleaved (A B A B ...) after a
warm-up with the median reported (and the spread of the repeats kept), the fp32/bf16 matmul and int8 linear rates,
and the analytic FLOP counts of the ViT, text tower and decoder (docs/original.md §9). Used by the other clipseg.speed
modules and bench.py.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from clipseg.precision import amp_dtype, quantize_linears


def vit_flops(tokens: int, blocks: int, width: int = 768, mlp: int = 3072) -> float:
    """Multiply-adds x 2 of `blocks` ViT blocks over `tokens` tokens (projections, attention, MLP)."""
    per_block = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    return blocks * per_block


def decoder_flops(tokens: int, dim: int = 64, ffn: int = 2048, width: int = 768, layers: int = 3) -> float:
    per_layer = 2 * tokens * (4 * dim * dim + 2 * dim * ffn) + 4 * tokens * tokens * dim
    return layers * (per_layer + 2 * tokens * width * dim) + 2 * (tokens - 1) * dim * 256


def text_flops(tokens: int, blocks: int = 12, width: int = 512) -> float:
    return vit_flops(tokens, blocks, width, 4 * width)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # `--clock cpu` switches every measurement to the process's CPU time (use_clock)


def use_clock(name: str) -> None:
    """Time every following measurement by `CLOCKS[name]` (bench.py --clock)."""
    global clock
    clock = CLOCKS[name]


class Spread(NamedTuple):
    """How far one variant's repeats spread: name, (max - min) / median, and each repeat's seconds in order."""

    name: str
    spread: float
    seconds: list[float]


_spreads: list[Spread] = []  # one per variant `interleaved` timed, for `repeat_spreads`


def repeat_spreads() -> list[Spread]:
    """How far the repeats of each variant `interleaved` timed since `clear_repeats()` spread, in the order measured
    (clipseg/speed/busy.py warns about noisy runs from them and lists them)."""
    return list(_spreads)


def clear_repeats() -> None:
    _spreads.clear()


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each variant (by `clock`), measured A B A B ... after `warmup` rounds; the spread
    of each variant's repeats is kept for `repeat_spreads`."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = clock()
            run()
            times[name].append(clock() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        if len(values) > 1:
            _spreads.append(Spread(name, (max(values) - min(values)) / max(medians[name], 1e-12), values))
    return medians


def matmul_rate(dtype: torch.dtype, device: str, repeats: int, n: int = 2048) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype` (median of `repeats`)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = interleaved({"mm": lambda: sync(device, a @ b)}, repeats, warmup=2)["mm"]
    return 2 * n**3 / seconds / 1e9


def int8_linear_rate(repeats: int, n: int = 2048) -> float:
    """GOP/s of a dynamic-quantised int8 n x n linear layer on n rows (activations quantised per call, as the
    int8 path runs them): the ceiling of `--precision int8` on this CPU."""
    layer = nn.Sequential(nn.Linear(n, n))
    quantize_linears(layer)  # the kernels and scheme of the int8 path
    rows = torch.randn(n, n)

    def run():
        with torch.inference_mode():
            return layer(rows)

    return 2 * n**3 / interleaved({"int8": run}, repeats, warmup=2)["int8"] / 1e9


def matmul_rates(device: str, repeats: int, int8: bool) -> dict:
    """This machine's limits, printed: the fp32 and bf16 matmul rates in GFLOP/s and, with `int8`, the int8 linear
    rate in GOP/s (`int8_linear_rate`)."""
    native = native_bf16(device)
    bf16_side = 2048 if native else 512  # emulated bf16: a 2048^3 matmul takes about a minute
    rates = {
        "fp32": matmul_rate(torch.float32, device, repeats),
        "bf16": matmul_rate(torch.bfloat16, device, repeats, n=bf16_side),
        "bf16_side": bf16_side,
    }
    if int8:
        rates["int8"] = int8_linear_rate(repeats)
    print(
        f"matmul: fp32 {rates['fp32']:.1f} GFLOP/s (2048^3), bf16 {rates['bf16']:.1f} GFLOP/s ({bf16_side}^3)"
        + (f", int8 dynamic-quantised linear {rates['int8']:.1f} GOP/s (2048^3)" if "int8" in rates else "")
        + ("" if native else "; no native bf16 on this device: bf16 is emulated")
    )
    return rates


def native_bf16(device: str) -> bool:
    """Whether bf16 runs natively on `device`; where it does not (AVX2 CPUs), PyTorch emulates it at a small
    fraction of the fp32 rate, so the bf16 cases shrink to stay affordable (and `--amp` stays in fp32)."""
    return amp_dtype(device) == torch.bfloat16


def sync(device: str, value: Tensor | None = None) -> Tensor | None:
    """Wait for the device's queued work (CUDA); returns `value`."""
    if device == "cuda":
        torch.cuda.synchronize()
    return value
