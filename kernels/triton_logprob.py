"""The fused token log-prob in Triton: logit tiles with `tl.dot`, online logsumexp, no [N, V] anything.

The all-Triton kernels, kept for comparison: impl="triton" runs the GEMM-fold strategy (triton_gemm.py).

    logp = triton_logprob(hidden, weight, targets, bias, temperature=1.0, ignore_index=-100)

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before this module is imported).
One program per (token block, vocabulary split) walks [BLOCK_N, BLOCK_V] tiles into a running max and
sum-exp per token. The gradient is "recompute" by default (the backward rebuilds each tile and hands
d = g · (onehot − p) / τ to two cuBLAS GEMMs) or, for a frozen head, "direction" (formed in the forward;
`TritonConfig(frozen_head="direction")`, with optional gradient filtering). Precision, the strategies'
flop counts and their measured speeds: docs/kernel.md. Simplification: launch configurations are fixed
per architecture, not autotuned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_tiles import DIRECTION_LAUNCH, dot_precision, interpreting, launch_config, logit_tile, sm_count, upcast

# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _direction_fwd_kernel(h_ptr,  # [N, H]
                          w_ptr,  # [V, H]
                          b_ptr,  # [V] (unused without HAS_BIAS)
                          t_ptr,  # [N] int64 targets; ignore_index never matches a column
                          part_ptr,  # [4, S, N] fp32 out: max, Σ exp, Σ exp without the target, target logit
                          acc_ptr,  # [S, N, H] fp32 out, zero-filled: Σ_{v≠t} exp(z_v − max) W_v
                          N, H, V, stride_h, stride_w, inv_tau, tiles_per_split, filter_eps,
                          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                          BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          FILTER: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    S = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ks = tl.arange(0, BLOCK_K)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    m = tl.full([BLOCK_N], -1e30, dtype=tl.float32)  # running max; finite, so −inf logits give 0, not NaN
    s = tl.zeros([BLOCK_N], dtype=tl.float32)  # running Σ_v exp(z_v − m)
    so = tl.zeros([BLOCK_N], dtype=tl.float32)  # the same without the target's term
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)  # the target's logit, once its tile passes
    acc_base = acc_ptr + split * N * H
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_tau,
                       HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST)  # [BLOCK_N, BLOCK_V]
        is_t = cols[None, :] == tgt[:, None]
        zt += tl.sum(tl.where(is_t, z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)  # [BLOCK_N] 1 where the max did not move
        e = tl.exp(z - m_new[:, None])  # [BLOCK_N, BLOCK_V] ≥ p, since the logsumexp ≥ the running max
        s = s * scale + tl.sum(e, axis=1)
        skip = False
        if FILTER:  # a tile that moved the max holds an e of 1, so a skipped tile never needs a rescale
            skip = tl.max(tl.max(e, axis=1), axis=0) < filter_eps
        e = tl.where(is_t, 0.0, e)  # the target's term is added exactly on the host
        so = so * scale + tl.sum(e, axis=1)
        m = m_new
        if not skip:
            for k0 in range(0, H, BLOCK_K):  # acc[rows, k] ← acc · scale + e · W[cols, k]
                k = k0 + ks
                w = tl.load(w_ptr + cols[:, None] * stride_w + k[None, :],
                            mask=col_ok[:, None] & (k[None, :] < H), other=0.0)  # [BLOCK_V, BLOCK_K]
                if UPCAST:
                    w = w.to(tl.float32)
                ptrs = acc_base + rows[:, None] * H + k[None, :]
                ok = row_ok[:, None] & (k[None, :] < H)
                a = tl.load(ptrs, mask=ok, other=0.0)  # [BLOCK_N, BLOCK_K] fp32
                a = a * scale[:, None] + tl.dot(e.to(w.dtype), w, input_precision=DOT_PRECISION)
                tl.store(ptrs, a, mask=ok)
    out = part_ptr + split * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + S * N, s, mask=row_ok)
    tl.store(out + 2 * S * N, so, mask=row_ok)
    tl.store(out + 3 * S * N, zt, mask=row_ok)


@triton.jit
def _lse_fwd_kernel(h_ptr,  # [N, H]
                    w_ptr,  # [V, H]
                    b_ptr,  # [V] (unused without HAS_BIAS)
                    t_ptr,  # [N] int64 targets; ignore_index never matches a column
                    max_ptr, sum_ptr, other_ptr, tgt_ptr,  # [S, N] fp32 partials, one row per vocabulary split
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
    so = tl.zeros([BLOCK_N], dtype=tl.float32)  # the same without the target's term: 1 − p_t, exactly
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)  # the target's logit, once its tile passes
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_tau,
                       HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST)  # [BLOCK_N, BLOCK_V]
        is_t = cols[None, :] == tgt[:, None]
        zt += tl.sum(tl.where(is_t, z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)  # [BLOCK_N]
        e = tl.exp(z - m_new[:, None])  # [BLOCK_N, BLOCK_V]
        s = s * scale + tl.sum(e, axis=1)
        so = so * scale + tl.sum(tl.where(is_t, 0.0, e), axis=1)
        m = m_new
    tl.store(max_ptr + split * N + rows, m, mask=row_ok)
    tl.store(sum_ptr + split * N + rows, s, mask=row_ok)
    tl.store(other_ptr + split * N + rows, so, mask=row_ok)
    tl.store(tgt_ptr + split * N + rows, zt, mask=row_ok)


@triton.jit
def _dlogits_kernel(h_ptr,  # [R, H] one block of tokens
                    w_ptr,  # [V, H]
                    b_ptr,  # [V] (unused without HAS_BIAS)
                    t_ptr,  # [R] int64 targets
                    lse_ptr,  # [R] fp32 logsumexp saved by the forward
                    q_ptr,  # [R] fp32 1 − p_t, from the forward's sum without the target
                    gs_ptr,  # [R] fp32 upstream gradient / τ, 0 on ignored tokens
                    d_ptr,  # [R, V] out: g (onehot − p) / τ, fp32 for fp16 inputs
                    R, H, V, stride_h, stride_w, stride_d, inv_tau,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < R
    col_ok = cols < V
    z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_tau,
                   HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST)  # [BLOCK_N, BLOCK_V]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    gs = tl.load(gs_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    q = tl.load(q_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])  # softmax, recomputed; 0 past the vocabulary
    # the target's 1 − p_t comes from the forward: recomputed, it cancels to noise when p_t ≈ 1
    d = gs[:, None] * tl.where(cols[None, :] == tgt[:, None], q[:, None], -p)
    tl.store(d_ptr + rows[:, None] * stride_d + cols[None, :], d.to(d_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# launchers


@dataclass
class TritonConfig:
    backward_elems: int = 1 << 25  # d block [rows, V] in bf16: 64 MB, like Liger's chunk (fp32 d: half the rows)
    programs_per_sm: int = 2  # vocabulary splits until the forward grid covers each SM twice
    direction_elems: int = 1 << 25  # frozen head: splits' fp32 [S, N, H] accumulators stay under 128 MB
    filter_eps: float = 0.0  # direction only: skip Σ p W tiles whose every p is below this; 0 keeps it exact
    frozen_head: str = "auto"  # auto: recompute (the faster on GPUs, docs/kernel.md), direction when filter_eps > 0

    def __post_init__(self):
        if self.frozen_head not in ("auto", "direction", "recompute"):
            raise ValueError(f"frozen_head must be auto, direction or recompute, not {self.frozen_head!r}")

    def direction(self) -> bool:
        return self.frozen_head == "direction" or (self.frozen_head == "auto" and self.filter_eps > 0)


def _splits(n, n_tiles, block_n, device, cfg, cap=None) -> tuple[int, int]:
    """(vocabulary splits, tiles per split): enough programs to fill the SMs, no split without a tile."""
    splits = triton.cdiv(cfg.programs_per_sm * sm_count(device), triton.cdiv(n, block_n))
    splits = max(1, min(splits, n_tiles, cap or n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def _common(h, weight, bias, lc):
    return dict(HAS_BIAS=bias is not None, BLOCK_N=lc.block_n, BLOCK_V=lc.block_v, BLOCK_K=lc.block_k,
                DOT_PRECISION=dot_precision(h.dtype), UPCAST=upcast(h), num_warps=lc.num_warps,
                num_stages=lc.num_stages)


def lse_forward(h, weight, bias, targets, inv_tau, *, splits=None, cfg: TritonConfig | None = None):
    """(logsumexp [N], target logits [N], 1 − p_t [N]) in fp32; h [N, H] and weight [V, H] share a dtype."""
    cfg = cfg or TritonConfig()
    n, hd = h.shape
    v = weight.shape[0]
    lc = launch_config(h.device, h.dtype)
    n_tiles = triton.cdiv(v, lc.block_v)
    splits, tiles_per_split = _splits(n, n_tiles, lc.block_n, h.device, cfg, cap=splits)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=h.device)  # max, Σ, Σ w/o target, z_t
    _lse_fwd_kernel[(triton.cdiv(n, lc.block_n), splits)](
        h, weight, bias if bias is not None else h, targets, part[0], part[1], part[2], part[3],
        n, hd, v, h.stride(0), weight.stride(0), inv_tau, tiles_per_split, **_common(h, weight, bias, lc))
    m = part[0].amax(0)  # [N] merge the splits: logsumexp of logsumexps
    wgt = torch.exp(part[0] - m)  # [S, N]
    s = (part[1] * wgt).sum(0)  # [N]
    return m + torch.log(s), part[3].sum(0), (part[2] * wgt).sum(0) / s


def direction_forward(h, weight, bias, targets, keep, inv_tau, *, splits=None, cfg: TritonConfig | None = None):
    """(log-probs [N], dℓ/dh [N, H]) in fp32, the head frozen; ignored tokens get 0 in both."""
    cfg = cfg or TritonConfig()
    n, hd = h.shape
    v = weight.shape[0]
    lc = launch_config(h.device, h.dtype, DIRECTION_LAUNCH)
    n_tiles = triton.cdiv(v, lc.block_v)
    cap = min(splits or n_tiles, max(1, cfg.direction_elems // max(n * hd, 1)))
    splits, tiles_per_split = _splits(n, n_tiles, lc.block_n, h.device, cfg, cap=cap)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=h.device)  # max, Σ exp, Σ exp w/o target, z_t
    acc = torch.zeros(splits, n, hd, dtype=torch.float32, device=h.device)  # [S, N, H]
    _direction_fwd_kernel[(triton.cdiv(n, lc.block_n), splits)](
        h, weight, bias if bias is not None else h, targets, part, acc,
        n, hd, v, h.stride(0), weight.stride(0), inv_tau, tiles_per_split, cfg.filter_eps,
        FILTER=cfg.filter_eps > 0, **_common(h, weight, bias, lc))
    m = part[0].amax(0)  # [N] merge the splits, each weighted by exp(its max − the max)
    wgt = torch.exp(part[0] - m)  # [S, N]
    s, so = (part[1] * wgt).sum(0), (part[2] * wgt).sum(0)  # [N]
    direction = acc[0].mul_(wgt[0].unsqueeze(1))  # [N, H]
    for i in range(1, splits):
        direction.add_(acc[i].mul_(wgt[i].unsqueeze(1)))
    w_t = weight.index_select(0, torch.where(keep, targets, 0)).float()  # [N, H]
    # dℓ/dh = (W_t · Σ_{v≠t} p_v − Σ_{v≠t} p_v W_v) / τ, the target's (1 − p_t) kept without cancellation
    direction.sub_(w_t.mul_(so.unsqueeze(1))).mul_((-keep.float() * inv_tau / s).unsqueeze(1))
    lse = m + torch.log(s)
    return torch.where(keep, part[3].sum(0) - lse, 0.0), direction


def dlogits(h, weight, bias, targets, lse, q, gs, inv_tau, out):
    """out [R, V] ← g (onehot − p) / τ for one block of R tokens, recomputing the logits."""
    r, hd = h.shape
    v = weight.shape[0]
    lc = launch_config(h.device, h.dtype)
    grid = (triton.cdiv(r, lc.block_n), triton.cdiv(v, lc.block_v))
    _dlogits_kernel[grid](
        h, weight, bias if bias is not None else h, targets, lse, q, gs, out,
        r, hd, v, h.stride(0), weight.stride(0), out.stride(0), inv_tau, **_common(h, weight, bias, lc))
    return out


def _grads_fp32(d, h, weight, grad_h, grad_w, cols):
    """grad_h ← d · W and grad_W += dᵀ · h on fp32 operands, the head upcast `cols` rows at a time."""
    gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if grad_h is not None else None  # [R, H]
    h32 = h.float() if grad_w is not None else None
    for v0 in range(0, weight.shape[0], cols):
        v1 = min(v0 + cols, weight.shape[0])
        w_c = weight[v0:v1].float()  # [Vc, H]
        if gh is not None:
            gh.addmm_(d[:, v0:v1], w_c)
        if grad_w is not None:
            grad_w[v0:v1].addmm_(d[:, v0:v1].t(), h32)  # [Vc, H]
    if gh is not None:
        grad_h.copy_(gh)


def backward(g, h, weight, bias, targets, keep, lse, q, inv_tau, needs, cfg: TritonConfig):
    """(grad_h, grad_W, grad_b), each None when not needed, in the inputs' dtypes."""
    need_h, need_w, need_b = needs
    n, hd = h.shape
    v = weight.shape[0]
    d_dtype = torch.float32 if h.dtype == torch.float16 else h.dtype  # g · p underflows fp16
    block = launch_config(h.device, h.dtype).block_n
    elems = cfg.backward_elems * 2 // d_dtype.itemsize
    rows = max(block, elems // max(v, 1) // block * block)
    gs = torch.where(keep, g.float() * inv_tau, 0.0)  # [N]
    d_buf = torch.empty(min(rows, n) * v, dtype=d_dtype, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=d_dtype) if need_w else None  # fp32 over token blocks for fp16
    grad_b = torch.zeros(v, dtype=torch.float32, device=h.device) if need_b else None
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        d = dlogits(h[r0:r1], weight, bias, targets[r0:r1], lse[r0:r1], q[r0:r1], gs[r0:r1], inv_tau,
                    d_buf[: (r1 - r0) * v].view(r1 - r0, v))  # [R, V]
        if d.dtype != h.dtype:
            _grads_fp32(d, h[r0:r1], weight, None if grad_h is None else grad_h[r0:r1], grad_w,
                        max(1, elems // max(hd, 1)))
        else:
            if grad_h is not None:
                torch.mm(d, weight, out=grad_h[r0:r1])  # [R, H]
            if grad_w is not None:
                grad_w.addmm_(d.t(), h[r0:r1])  # [V, H] fp32 inside the GEMM, one rounding per token block
        if grad_b is not None:
            grad_b += d.sum(0, dtype=torch.float32)
    grad_w = None if grad_w is None else grad_w.to(weight.dtype)
    grad_b = None if grad_b is None else grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


# ----------------------------------------------------------------------------------------------------
# autograd Function and the functional entry


class TritonLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_tau, ignore_index, cfg):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.frozen_head = need_h and not (need_w or need_b) and cfg.direction()
        keep = targets != ignore_index  # [N]
        ctx.inv_tau, ctx.cfg, ctx.hidden_dtype = inv_tau, cfg, hidden.dtype
        if ctx.frozen_head:  # direction: the whole gradient is formed here; backward only scales it
            out, direction = direction_forward(hidden, weight, bias, targets, keep, inv_tau, cfg=cfg)
            ctx.save_for_backward(direction)
            return out
        lse, zt, q = lse_forward(hidden, weight, bias, targets, inv_tau, cfg=cfg)
        ctx.save_for_backward(hidden, weight, bias, targets, keep, lse, q)
        return torch.where(keep, zt - lse, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.frozen_head:
            (direction,) = ctx.saved_tensors
            grad_h = direction * grad_out.float().unsqueeze(1)  # [N, H]: O(N·H), no logits
            return grad_h.to(ctx.hidden_dtype), None, None, None, None, None, None
        hidden, weight, bias, targets, keep, lse, q = ctx.saved_tensors
        grads = backward(grad_out, hidden, weight, bias, targets, keep, lse, q, ctx.inv_tau,
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


__all__ = ["TritonConfig", "direction_forward", "lse_forward", "triton_logprob"]
