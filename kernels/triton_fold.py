"""Triton's share of the GEMM-fold strategy: fold a logit tile that cuBLAS computed into per-token statistics.

    fold(z, bias_c, targets, v0, stats, scale, probs, inv_tau, p_scale)    # forward, one tile
    grad_tile(z, bias_c, targets, v0, lse, q, gs, d, inv_tau)              # backward, one tile

`z` is one [R, C] fp32 tile of h · Wᵀ (token block × vocabulary chunk) written by a cuBLAS GEMM in
`triton_gemm.py`; these kernels add the bias, divide by τ and never touch W. `_fold_kernel` updates the
running max, Σ_{v≠t} exp(z_v − max) (1 − p_t without cancellation) and the target's logit of each token,
and optionally writes exp(z − max) for the next GEMM (E_p[W]); `_grad_kernel` writes the tile's
d = g (onehot − p) / τ. Both are memory-bound element-wise passes: one program per block of rows, no
`tl.dot`. Simplification: one launch configuration for every architecture (no tensor cores, no shared
memory to size), checked for spills on sm_80 / 86 / 89 / 90 by tests/test_kernels_aot.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_tiles import LaunchConfig

# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _biased(z_ptr, b_ptr, rows, cols, row_ok, col_ok, stride_z, inv_tau, HAS_BIAS: tl.constexpr):
    """(z[rows, cols] + b[cols]) / τ in fp32, −inf past the chunk: [BLOCK_N, BLOCK_V]."""
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], z * inv_tau, float("-inf"))


@triton.jit
def _fold_kernel(z_ptr,  # [R, C] fp32 h · Wᵀ of one token block and vocabulary chunk, before bias and τ
                 b_ptr,  # [C] the chunk's bias (unused without HAS_BIAS)
                 t_ptr,  # [R] int64 target ids, −1 where ignored; a target outside [v0, v0 + C) never matches
                 stat_ptr,  # [3, R] fp32 in / out, rows stride_s apart: max, Σ_{v≠t} exp(z_v − max), z_t
                 scale_ptr,  # [R] fp32 out: exp(old max − new max), to rescale what was summed before
                 p_ptr,  # [R, C] out when WRITE_P: exp(z − new max) · p_scale, 0 at the target, input dtype
                 R, C, v0, stride_z, stride_s, stride_p, inv_tau, p_scale,
                 HAS_BIAS: tl.constexpr, WRITE_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1) - v0  # [BLOCK_N] the target's column in this chunk
    m_old = tl.load(stat_ptr + rows, mask=row_ok, other=-1e30)  # finite: a tile of −inf logits gives 0, not NaN
    m = m_old
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_V):  # pass 1: the chunk's max and the target's logit
        cols = c0 + tl.arange(0, BLOCK_V)
        col_ok = cols < C
        z = _biased(z_ptr, b_ptr, rows, cols, row_ok, col_ok, stride_z, inv_tau, HAS_BIAS)
        m = tl.maximum(m, tl.max(z, axis=1))
        is_t = (cols[None, :] == tgt[:, None]) & col_ok[None, :]  # a target past the chunk is the next one's
        zt += tl.sum(tl.where(is_t, z, 0.0), axis=1)
    so = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_V):  # pass 2: Σ_{v≠t} exp(z_v − m), and the probabilities' numerators
        cols = c0 + tl.arange(0, BLOCK_V)
        col_ok = cols < C
        z = _biased(z_ptr, b_ptr, rows, cols, row_ok, col_ok, stride_z, inv_tau, HAS_BIAS)
        e = tl.where(cols[None, :] == tgt[:, None], 0.0, tl.exp(z - m[:, None]))  # the target's term: on the host
        so += tl.sum(e, axis=1)
        if WRITE_P:
            tl.store(p_ptr + rows[:, None] * stride_p + cols[None, :], (e * p_scale).to(p_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
    scale = tl.exp(m_old - m)  # [BLOCK_N] 1 where the max did not move, 0 on the first chunk
    so_old = tl.load(stat_ptr + stride_s + rows, mask=row_ok, other=0.0)
    zt_old = tl.load(stat_ptr + 2 * stride_s + rows, mask=row_ok, other=0.0)
    tl.store(stat_ptr + rows, m, mask=row_ok)
    tl.store(stat_ptr + stride_s + rows, so_old * scale + so, mask=row_ok)
    tl.store(stat_ptr + 2 * stride_s + rows, zt_old + zt, mask=row_ok)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


@triton.jit
def _grad_kernel(z_ptr,  # [R, C] fp32 h · Wᵀ, recomputed by cuBLAS in the backward
                 b_ptr,  # [C] the chunk's bias (unused without HAS_BIAS)
                 t_ptr,  # [R] int64 target ids, −1 where ignored
                 lse_ptr,  # [R] fp32 logsumexp from the forward
                 q_ptr,  # [R] fp32 1 − p_t from the forward (Σ_{v≠t} p_v: exact for confident tokens)
                 gs_ptr,  # [R] fp32 upstream gradient / τ, 0 on ignored tokens
                 d_ptr,  # [R, C] out: g (onehot − p) / τ, input dtype (fp32 for fp16 inputs)
                 R, C, v0, stride_z, stride_d, inv_tau,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < R
    col_ok = cols < C
    z = _biased(z_ptr, b_ptr, rows, cols, row_ok, col_ok, stride_z, inv_tau, HAS_BIAS)  # [BLOCK_N, BLOCK_V]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    q = tl.load(q_ptr + rows, mask=row_ok, other=0.0)
    gs = tl.load(gs_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1) - v0
    p = tl.exp(z - lse[:, None])
    d = gs[:, None] * tl.where(cols[None, :] == tgt[:, None], q[:, None], -p)  # 1 − p_t from the forward
    tl.store(d_ptr + rows[:, None] * stride_d + cols[None, :], d.to(d_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# launchers

# memory-bound passes: rows × columns per program sized for 16 fp32 values a thread, enough programs to
# cover every SM several times at R = 4096 (block_k and num_stages are unused: no K-loop, no tl.dot)
FOLD_LAUNCH = LaunchConfig(block_n=4, block_v=1024, block_k=0, num_warps=8, num_stages=1)
GRAD_LAUNCH = LaunchConfig(block_n=16, block_v=256, block_k=0, num_warps=8, num_stages=1)
# the interpreter runs each program in numpy: mid-sized blocks keep the tests quick and still walk columns
FOLD_INTERPRETER = LaunchConfig(block_n=8, block_v=128, block_k=0, num_warps=1, num_stages=1)
GRAD_INTERPRETER = LaunchConfig(block_n=16, block_v=128, block_k=0, num_warps=1, num_stages=1)


def fold(z, bias_c, targets, v0, stats, scale, probs, inv_tau, p_scale):
    """Fold one tile z [R, C] into stats [3, R] (max, Σ_{v≠t} exp, z_t); scale [R] ← exp(old − new max);
    probs [R, C] ← exp(z − max) · p_scale with the target's column 0, when probs is not None."""
    r, c = z.shape
    lc = FOLD_LAUNCH if z.is_cuda else FOLD_INTERPRETER
    _fold_kernel[(triton.cdiv(r, lc.block_n),)](
        z, bias_c if bias_c is not None else z, targets, stats, scale, probs if probs is not None else z,
        r, c, v0, z.stride(0), stats.stride(0), probs.stride(0) if probs is not None else 0, inv_tau, p_scale,
        HAS_BIAS=bias_c is not None, WRITE_P=probs is not None, BLOCK_N=lc.block_n, BLOCK_V=lc.block_v,
        num_warps=lc.num_warps, num_stages=lc.num_stages)


def grad_tile(z, bias_c, targets, v0, lse, q, gs, d, inv_tau):
    """d [R, C] ← g (onehot − p) / τ for one tile z [R, C] of h · Wᵀ."""
    r, c = z.shape
    lc = GRAD_LAUNCH if z.is_cuda else GRAD_INTERPRETER
    _grad_kernel[(triton.cdiv(r, lc.block_n), triton.cdiv(c, lc.block_v))](
        z, bias_c if bias_c is not None else z, targets, lse, q, gs, d, r, c, v0, z.stride(0), d.stride(0),
        inv_tau, HAS_BIAS=bias_c is not None, BLOCK_N=lc.block_n, BLOCK_V=lc.block_v, num_warps=lc.num_warps,
        num_stages=lc.num_stages)
    return d


__all__ = ["FOLD_LAUNCH", "GRAD_LAUNCH", "fold", "grad_tile"]
