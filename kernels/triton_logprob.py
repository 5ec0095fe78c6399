"""The fused token log-prob in Triton: logit tiles with `tl.dot`, online logsumexp, recompute in backward.

    logp = triton_logprob(hidden, weight, targets, bias, temperature=1.0, ignore_index=-100)

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before this module is imported).

Forward (`_lse_fwd_kernel`): one program per (token block, vocabulary split). It walks its split's vocab
tiles; each [BLOCK_N, BLOCK_V] logit tile is a K-loop of `tl.dot` over H with fp32 accumulation, folded
into a running max and sum-exp per token, and the target's logit is picked when its tile passes by. The
splits' partials (max, sum, target logit) are O(N · splits); merging them gives the logsumexp [N], the
only thing saved for backward. Splitting the vocabulary keeps every SM busy when N is small.

Backward (`_dlogits_kernel`): token blocks of `rows` at a time, it recomputes the logit tiles from the
saved logsumexp and writes d = g · (onehot − p) / τ for that block ([rows, V], in the input dtype, a few
tens of MB); two cuBLAS GEMMs then give grad_h = d · W and, only when W requires grad, grad_W += dᵀ · h
(the bias gradient is d's column sum). The GEMMs are plain GEMMs, where cuBLAS is at its best; what no
library does — recomputing logits and the softmax gradient without writing [N, V] — is the kernel's job.
This avoids the alternative of atomics into grad_h / grad_W from every (token, vocab) tile, whose
traffic grows with V / BLOCK_V. With the head frozen (QLoRA) the backward is the kernel plus one GEMM.

Precision: tiles accumulate in fp32 for fp32, bf16 and fp16 inputs; fp32 inputs use 3-pass TF32
(`tf32x3`, about fp32 accuracy on tensor cores). grad_W is accumulated over token blocks in the weight's
dtype, like Liger's: each block's GEMM sums in fp32 and rounds once; blocks are as large as the budget allows.
Simplifications: no gradient filtering of tiles whose probabilities underflow; launch configurations
are fixed per architecture (below), not autotuned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_tau,
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


@triton.jit
def _lse_fwd_kernel(h_ptr,  # [N, H]
                    w_ptr,  # [V, H]
                    b_ptr,  # [V] (unused without HAS_BIAS)
                    t_ptr,  # [N] int64 targets; ignore_index never matches a column
                    max_ptr, sum_ptr, tgt_ptr,  # [S, N] fp32 partials, one row per vocabulary split
                    N, H, V, stride_h, stride_w, inv_tau, tiles_per_split,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    m = tl.full([BLOCK_N], -1e30, dtype=tl.float32)  # running max; finite, so −inf logits give 0, not NaN
    s = tl.zeros([BLOCK_N], dtype=tl.float32)  # running sum of exp(z − m)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)  # the target's logit, once its tile passes
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_tau,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST)  # [BLOCK_N, BLOCK_V]
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    tl.store(max_ptr + split * N + rows, m, mask=row_ok)
    tl.store(sum_ptr + split * N + rows, s, mask=row_ok)
    tl.store(tgt_ptr + split * N + rows, zt, mask=row_ok)


@triton.jit
def _dlogits_kernel(h_ptr,  # [R, H] one block of tokens
                    w_ptr,  # [V, H]
                    b_ptr,  # [V] (unused without HAS_BIAS)
                    t_ptr,  # [R] int64 targets
                    lse_ptr,  # [R] fp32 logsumexp saved by the forward
                    gs_ptr,  # [R] fp32 upstream gradient / τ, 0 on ignored tokens
                    d_ptr,  # [R, V] out: g (onehot − p) / τ in the input dtype
                    R, H, V, stride_h, stride_w, stride_d, inv_tau,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < R
    col_ok = cols < V
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_tau,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST)  # [BLOCK_N, BLOCK_V]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    gs = tl.load(gs_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None])  # softmax, recomputed; 0 past the vocabulary
    d = gs[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    tl.store(d_ptr + rows[:, None] * stride_d + cols[None, :], d.to(d_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# launchers


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int = 64  # tokens per tile: rows of the tl.dot
    block_v: int = 128  # vocabulary columns per tile
    block_k: int = 64  # hidden-size step of the K-loop
    num_warps: int = 4  # 4 warps fill a 64 × 128 tile's MMAs without spilling the fp32 accumulator
    num_stages: int = 3  # software-pipelined loads: hides global-memory latency behind the MMAs


# (compute capability) → (config for bf16 / fp16, config for fp32). fp32 tiles halve block_k (4-byte
# loads, same shared memory per stage); before Hopper they also halve block_v, because mma.sync keeps
# tf32x3's split operands in registers (wgmma reads them from shared memory). Checked for spills by
# tests/test_kernels_aot.py.
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
# the interpreter runs each program in numpy: few, mid-sized tiles keep the tests quick
INTERPRETER = LaunchConfig(block_n=32, block_v=128, block_k=32, num_warps=1, num_stages=1)


@dataclass
class TritonConfig:
    backward_elems: int = 1 << 25  # d block [rows, V] in the input dtype: 64 MB bf16, like Liger's chunk
    programs_per_sm: int = 2  # vocabulary splits until the forward grid covers each SM twice


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def arch_config(cap: tuple[int, int], dtype: torch.dtype) -> LaunchConfig:
    """The tile sizes for compute capability `cap` and input `dtype`; unknown archs get the nearest."""
    known = LAUNCH.get(cap) or (LAUNCH[(9, 0)] if cap >= (9, 0) else LAUNCH[(8, 0)] if cap == (8, 0)
                                else LAUNCH[(8, 6)])
    return known[1] if dtype == torch.float32 else known[0]


def launch_config(device: torch.device, dtype: torch.dtype) -> LaunchConfig:
    return arch_config(torch.cuda.get_device_capability(device), dtype) if device.type == "cuda" else INTERPRETER


def dot_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # 16-bit inputs ignore it


def upcast(h) -> bool:
    """The interpreter multiplies bf16 bit patterns as integers (triton 3.x): feed it fp32 there."""
    return h.device.type != "cuda" and h.dtype == torch.bfloat16


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def lse_forward(h, weight, bias, targets, inv_tau, *, splits=None, cfg: TritonConfig | None = None):
    """(logsumexp [N], target logits [N]) in fp32; h [N, H] and weight [V, H] share a dtype."""
    cfg = cfg or TritonConfig()
    n, hd = h.shape
    v = weight.shape[0]
    lc = launch_config(h.device, h.dtype)
    row_blocks = triton.cdiv(n, lc.block_n)
    n_tiles = triton.cdiv(v, lc.block_v)
    if splits is None:
        splits = triton.cdiv(cfg.programs_per_sm * _sm_count(h.device), row_blocks)
    splits = max(1, min(splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)  # no split left without a tile
    part = torch.empty(3, splits, n, dtype=torch.float32, device=h.device)  # max, sum, target logit
    _lse_fwd_kernel[(row_blocks, splits)](
        h, weight, bias if bias is not None else h, targets, part[0], part[1], part[2],
        n, hd, v, h.stride(0), weight.stride(0), inv_tau, tiles_per_split,
        HAS_BIAS=bias is not None, BLOCK_N=lc.block_n, BLOCK_V=lc.block_v, BLOCK_K=lc.block_k,
        DOT_PRECISION=dot_precision(h.dtype), UPCAST=upcast(h), num_warps=lc.num_warps,
        num_stages=lc.num_stages)
    m = part[0].amax(0)  # [N] merge the splits: logsumexp of logsumexps
    lse = m + torch.log((part[1] * torch.exp(part[0] - m)).sum(0))
    return lse, part[2].sum(0)


def dlogits(h, weight, bias, targets, lse, gs, inv_tau, out):
    """out [R, V] ← g (onehot − p) / τ for one block of R tokens, recomputing the logits."""
    r, hd = h.shape
    v = weight.shape[0]
    lc = launch_config(h.device, h.dtype)
    grid = (triton.cdiv(r, lc.block_n), triton.cdiv(v, lc.block_v))
    _dlogits_kernel[grid](
        h, weight, bias if bias is not None else h, targets, lse, gs, out,
        r, hd, v, h.stride(0), weight.stride(0), out.stride(0), inv_tau,
        HAS_BIAS=bias is not None, BLOCK_N=lc.block_n, BLOCK_V=lc.block_v, BLOCK_K=lc.block_k,
        DOT_PRECISION=dot_precision(h.dtype), UPCAST=upcast(h), num_warps=lc.num_warps,
        num_stages=lc.num_stages)
    return out


def backward(g, h, weight, bias, targets, keep, lse, inv_tau, needs, cfg: TritonConfig):
    """(grad_h, grad_W, grad_b), each None when not needed, in the inputs' dtypes."""
    need_h, need_w, need_b = needs
    n, hd = h.shape
    v = weight.shape[0]
    block = launch_config(h.device, h.dtype).block_n
    rows = max(block, cfg.backward_elems // max(v, 1) // block * block)
    gs = torch.where(keep, g.float() * inv_tau, 0.0)  # [N]
    d_buf = torch.empty(min(rows, n) * v, dtype=h.dtype, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    grad_b = torch.zeros(v, dtype=torch.float32, device=h.device) if need_b else None
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        d = dlogits(h[r0:r1], weight, bias, targets[r0:r1], lse[r0:r1], gs[r0:r1], inv_tau,
                    d_buf[: (r1 - r0) * v].view(r1 - r0, v))  # [R, V]
        if grad_h is not None:
            torch.mm(d, weight, out=grad_h[r0:r1])  # [R, H]
        if grad_w is not None:
            grad_w.addmm_(d.t(), h[r0:r1])  # [V, H] fp32 inside the GEMM, one rounding per token block
        if grad_b is not None:
            grad_b += d.sum(0, dtype=torch.float32)
    grad_b = None if grad_b is None else grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


# ----------------------------------------------------------------------------------------------------
# autograd Function and the functional entry


class TritonLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_tau, ignore_index, cfg):
        keep = targets != ignore_index  # [N]
        lse, zt = lse_forward(hidden, weight, bias, targets, inv_tau, cfg=cfg)
        ctx.inv_tau, ctx.cfg = inv_tau, cfg
        ctx.save_for_backward(hidden, weight, bias, targets, keep, lse)
        return torch.where(keep, zt - lse, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, keep, lse = ctx.saved_tensors
        grads = backward(grad_out, hidden, weight, bias, targets, keep, lse, ctx.inv_tau,
                         ctx.needs_input_grad[:3], ctx.cfg)
        return (*grads, None, None, None, None)


def triton_logprob(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100,
                   cfg: TritonConfig | None = None):
    """(..., H), (V, H), (...) → (...) fp32 log-probs of `targets`; ignored positions give 0."""
    if hidden.device.type != "cuda" and not interpreting():
        raise RuntimeError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    shape = targets.shape
    dtype = torch.promote_types(hidden.dtype, weight.dtype)  # tl.dot wants one dtype on both sides
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()  # [N, H]
    w = weight.to(dtype).contiguous()  # [V, H]
    t = targets.reshape(-1).long().contiguous()  # [N]
    out = TritonLogprob.apply(h, w, bias, t, 1.0 / temperature, ignore_index, cfg or TritonConfig())
    return out.reshape(shape)


__all__ = ["LAUNCH", "LaunchConfig", "TritonConfig", "arch_config", "launch_config", "triton_logprob"]
