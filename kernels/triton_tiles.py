"""What the Triton log-prob kernels share: one logit tile as a K-loop of `tl.dot`, and the launch table.

    from .triton_tiles import logit_tile, launch_config

`logit_tile` is a `@triton.jit` helper inlined into each kernel of `triton_logprob.py`; the launch table
maps a compute capability and an input dtype to tile sizes, warps and pipeline stages, checked for
register spills on sm_80 / 86 / 89 / 90 by tests/test_kernels_aot.py. Simplification: configurations are
fixed per architecture, not autotuned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------
# the shared tile


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_tau,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """z = (h[rows] · W[cols]ᵀ + b[cols]) / τ as a [BLOCK_N, BLOCK_V] fp32 tile; −inf past the vocabulary."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        a = tl.load(h_ptr + rows[:, None] * stride_h + k[None, :],
                    mask=row_ok[:, None] & (k[None, :] < H), other=0.0)  # [BLOCK_N, BLOCK_K]
        b = tl.load(w_ptr + cols[None, :] * stride_w + k[:, None],
                    mask=col_ok[None, :] & (k[:, None] < H), other=0.0)  # [BLOCK_K, BLOCK_V]
        if UPCAST:  # exact: a product of two bf16 values fits in fp32
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_tau, float("-inf"))  # [BLOCK_N, BLOCK_V]


# ----------------------------------------------------------------------------------------------------
# launch configurations


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int = 64  # tokens per tile: rows of the tl.dot
    block_v: int = 128  # vocabulary columns per tile
    block_k: int = 64  # hidden-size step of the K-loop
    num_warps: int = 4  # 4 warps fill a 64 × 128 tile's MMAs without spilling the fp32 accumulator
    num_stages: int = 3  # software-pipelined loads: hides global-memory latency behind the MMAs


# (compute capability) → (config for bf16 / fp16, config for fp32). fp32 tiles halve block_k (4-byte
# loads, same shared memory per stage); before Hopper they also halve block_v, because mma.sync keeps
# tf32x3's split operands in registers (wgmma reads them from shared memory).
LAUNCH: dict[tuple[int, int], tuple[LaunchConfig, LaunchConfig]] = {
    # A100: 164 KB shared memory per SM, big tiles amortise the loads
    (8, 0): (LaunchConfig(128, 128, 64, num_warps=8, num_stages=3), LaunchConfig(128, 64, 32, num_warps=8)),
    # RTX 30xx (sm_86), RTX 40xx / L4 (sm_89): 100 KB shared memory, two CTAs of 4 warps per SM
    (8, 6): (LaunchConfig(64, 128, 64, num_warps=4, num_stages=3), LaunchConfig(64, 64, 32, num_warps=4)),
    (8, 9): (LaunchConfig(64, 128, 64, num_warps=4, num_stages=3), LaunchConfig(64, 64, 32, num_warps=4)),
    # H100 / H200: 228 KB shared memory, a deeper pipeline for faster tensor cores
    (9, 0): (LaunchConfig(128, 128, 64, num_warps=8, num_stages=4),
             LaunchConfig(128, 128, 32, num_warps=8, num_stages=4)),
}
# The frozen-head forward keeps exp(z − m) [BLOCK_N, BLOCK_V] in registers through its Σ p W loop, on
# top of the logit tile's: a smaller block_k (its H step) keeps every arch free of spills.
DIRECTION_LAUNCH: dict[tuple[int, int], tuple[LaunchConfig, LaunchConfig]] = {
    (8, 0): (LaunchConfig(128, 128, 32, num_warps=8, num_stages=3), LaunchConfig(128, 64, 16, num_warps=8)),
    (8, 6): (LaunchConfig(64, 128, 64, num_warps=8, num_stages=3), LaunchConfig(128, 64, 16, num_warps=8)),
    (8, 9): (LaunchConfig(64, 128, 64, num_warps=8, num_stages=3), LaunchConfig(128, 64, 16, num_warps=8)),
    (9, 0): (LaunchConfig(128, 128, 32, num_warps=8, num_stages=4), LaunchConfig(128, 64, 32, num_warps=8)),
}
# the interpreter runs each program in numpy: few, mid-sized tiles keep the tests quick
INTERPRETER = LaunchConfig(block_n=32, block_v=128, block_k=32, num_warps=1, num_stages=1)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def arch_config(cap: tuple[int, int], dtype: torch.dtype, table=LAUNCH) -> LaunchConfig:
    """The tile sizes for compute capability `cap` and input `dtype`; unknown archs get the nearest."""
    known = table.get(cap) or (table[(9, 0)] if cap >= (9, 0) else table[(8, 0)] if cap == (8, 0)
                               else table[(8, 6)])
    return known[1] if dtype == torch.float32 else known[0]


def launch_config(device: torch.device, dtype: torch.dtype, table=LAUNCH) -> LaunchConfig:
    if device.type != "cuda":
        return INTERPRETER
    return arch_config(torch.cuda.get_device_capability(device), dtype, table)


def dot_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # 16-bit inputs ignore it


def upcast(h) -> bool:
    """The interpreter multiplies bf16 bit patterns as integers (triton 3.x): feed it fp32 there."""
    return h.device.type != "cuda" and h.dtype == torch.bfloat16


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


__all__ = ["DIRECTION_LAUNCH", "INTERPRETER", "LAUNCH", "LaunchConfig", "arch_config", "dot_precision", "interpreting",
           "launch_config", "logit_tile", "sm_count", "upcast"]
