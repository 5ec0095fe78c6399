"""The GEMM-fold token log-prob: cuBLAS for every GEMM, Triton only to fold logit tiles into statistics.

    logp = gemm_logprob(hidden, weight, targets, bias, temperature=1.0, ignore_index=-100)

The GPU default (`fused_logprob(impl="triton")`); runs on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1. Per [block_n tokens × block_v vocabulary] tile, a cuBLAS GEMM writes h · Wᵀ into one
reused fp32 buffer and `triton_fold.py` folds it into each token's running max, Σ_{v≠t} exp and target
logit. The three cases, chosen from what requires grad:

- frozen head (only `hidden` requires grad): the fold also writes exp(z − max) and a second GEMM
  accumulates E_p[W] per token in fp32, so the forward forms dℓ/dh = (W_t (1 − p_t) − Σ_{v≠t} p_v W_v) / τ
  and the backward is a per-row scale: 4·N·H·V flops;
- trainable head (W or the bias requires grad): the forward keeps the logsumexp and 1 − p_t; the backward
  recomputes each tile, `_grad_kernel` writes d = g (onehot − p) / τ, and cuBLAS gives dX = d · W and
  dW = dᵀ · h per vocabulary chunk over all tokens at once (fp32 accumulation inside one GEMM): 8·N·H·V;
- nothing requires grad (reference log-probs): the forward alone, 2·N·H·V, nothing saved.

Extra memory: one fp32 tile, one tile of probabilities (or a [N, block_v] block of d), O(N) statistics and
O(N·H) fp32 accumulators. Derivation and precision: docs/kernel.md. Simplification: block sizes are fixed
by `GemmConfig`, not tuned per card; not yet measured on a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .triton_fold import fold, grad_tile
from .triton_tiles import interpreting

# fp16 probabilities are stored ×2¹⁴ (exact, undone in fp32): exp(z − max) ≤ 1 keeps fp16's normal range
# down to 4e-9 instead of 6e-5; bf16 and fp32 have fp32's exponent range already
P_SCALE = {torch.float16: 2.0**14}


@dataclass
class GemmConfig:
    block_n: int = 4096  # tokens per logit GEMM (its M): 2 blocks at N 8192, large enough for cuBLAS's best tiles
    block_v: int = 8192  # vocabulary columns per tile (the GEMM's N): the [4096, 8192] fp32 tile is 128 MB
    grad_elems: int = 1 << 25  # trainable backward: the [N, Vc] block of d stays under 64 MB of bf16
    min_cols: int = 256  # but never fewer columns than this, however many tokens: thinner GEMMs run slowly

    def __post_init__(self):
        if min(self.block_n, self.block_v, self.grad_elems, self.min_cols) < 1:
            raise ValueError(f"GemmConfig sizes must be positive, got {self}")


# ----------------------------------------------------------------------------------------------------
# GEMMs


@functools.cache
def _has_out_dtype() -> bool:
    """Whether this torch has `torch.mm(..., out_dtype=torch.float32)` (16-bit in, fp32 out; torch ≥ 2.8)."""
    a = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return False
    return True


def mm_f32(a, b, out):
    """out (fp32) ← a · b with fp32 accumulation and fp32 output: cuBLAS's 16-bit-in, fp32-out GEMM on CUDA;
    elsewhere (CPU under the interpreter, or an older torch) on fp32 copies: the same exact products."""
    if a.dtype == b.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda and a.dtype == b.dtype and _has_out_dtype():
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _view(buf, r, c):
    return buf[: r * c].view(r, c)


# ----------------------------------------------------------------------------------------------------
# forward: statistics, and for a frozen head the gradient direction


def _finish(stats, keep):
    """(log-probs, logsumexp, 1 − p_t, Σ_v exp(z_v − max)) [N] from the statistics [3, N]."""
    m, so, zt = stats
    s = so + torch.where(keep, torch.exp(zt - m), 0.0)  # the target's own term, added exactly
    lse = m + torch.log(s)
    return torch.where(keep, zt - lse, 0.0), lse, so / s, s


def _direction(acc, weight, targets, keep, q, s, inv_tau, p_scale, rows):
    """acc [N, H] ← (W_t (1 − p_t) − Σ_{v≠t} p_v W_v) / τ in place, 0 on ignored tokens."""
    for r0, r1 in _blocks(acc.shape[0], rows):
        w_t = weight.index_select(0, targets[r0:r1].clamp(min=0)).float()  # [R, H]
        acc[r0:r1].div_((s[r0:r1] * p_scale).unsqueeze(1)).sub_(w_t.mul_(q[r0:r1].unsqueeze(1)))
        acc[r0:r1].mul_((-keep[r0:r1].float() * inv_tau).unsqueeze(1))  # no cancellation when p_t ≈ 1
    return acc


def forward(h, weight, bias, targets, keep, inv_tau, want_direction, cfg: GemmConfig):
    """(log-probs [N], logsumexp [N], 1 − p_t [N], dℓ/dh [N, H] fp32 or None); targets are −1 where ignored."""
    n, hd = h.shape
    v = weight.shape[0]
    rows, cols = min(n, cfg.block_n), min(v, cfg.block_v)
    f32 = dict(dtype=torch.float32, device=h.device)
    tile = torch.empty(rows * cols, **f32)  # the one reused logit tile
    stats = torch.zeros(3, n, **f32)  # running max, Σ_{v≠t} exp(z_v − max), target logit
    stats[0] = -1e30
    scale = torch.empty(rows, **f32)
    p_scale = P_SCALE.get(h.dtype, 1.0)
    probs = torch.empty(rows * cols, dtype=h.dtype, device=h.device) if want_direction else None
    acc = torch.empty(n, hd, **f32) if want_direction else None  # Σ_{v≠t} exp(z_v − max) W_v · p_scale
    tmp = torch.empty(rows, hd, **f32) if want_direction and v > cols else None
    for r0, r1 in _blocks(n, rows):
        r = r1 - r0
        for v0, v1 in _blocks(v, cols):
            w_c = weight[v0:v1]  # [Vc, H]
            z = mm_f32(h[r0:r1], w_c.t(), _view(tile, r, v1 - v0))  # [R, Vc]
            p = None if probs is None else _view(probs, r, v1 - v0)
            fold(z, None if bias is None else bias[v0:v1], targets[r0:r1], v0, stats[:, r0:r1], scale, p,
                 inv_tau, p_scale)
            if p is None:
                continue
            if v0 == 0:
                mm_f32(p, w_c, acc[r0:r1])  # [R, H]
            else:  # acc ← acc · exp(old max − new max) + p · W_c
                torch.addcmul(mm_f32(p, w_c, tmp[:r]), acc[r0:r1], scale[:r].unsqueeze(1), out=acc[r0:r1])
    out, lse, q, s = _finish(stats, keep)
    if acc is not None:
        _direction(acc, weight, targets, keep, q, s, inv_tau, p_scale, rows)
    return out, lse, q, acc


# ----------------------------------------------------------------------------------------------------
# backward of the trainable head: recompute each tile, d by Triton, dX and dW by cuBLAS


def _grad_w_into(out, d, h, tmp):
    """out [Vc, H] ← dᵀ · h over all N tokens in one GEMM (fp32 accumulation inside it, one rounding)."""
    if d.dtype == h.dtype:
        torch.mm(d.t(), h, out=out)
    else:  # fp16 inputs: d is fp32
        out.copy_(mm_f32(d.t(), h, tmp[: out.shape[0]]))


def backward(g, h, weight, bias, targets, keep, lse, q, inv_tau, needs, cfg: GemmConfig):
    """(grad_h, grad_W, grad_b), each None when not needed, in the inputs' dtypes."""
    need_h, need_w, need_b = needs
    n, hd = h.shape
    v = weight.shape[0]
    rows = min(n, cfg.block_n)
    cols = min(v, cfg.block_v, max(cfg.min_cols, cfg.grad_elems // n))
    f32 = dict(dtype=torch.float32, device=h.device)
    d_dtype = torch.float32 if h.dtype == torch.float16 else h.dtype  # g · p underflows fp16
    gs = torch.where(keep, g.float() * inv_tau, 0.0)  # [N]
    tile = torch.empty(rows * cols, **f32)
    d_all = torch.empty(n, cols, dtype=d_dtype, device=h.device)  # [N, Vc] d of one vocabulary chunk
    grad_h = torch.empty(n, hd, **f32) if need_h else None  # fp32 over the vocabulary chunks
    tmp_h = torch.empty(rows, hd, **f32) if need_h and v > cols else None
    tmp_w = torch.empty(cols, hd, **f32) if need_w and d_dtype != h.dtype else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty(v, **f32) if need_b else None
    for v0, v1 in _blocks(v, cols):
        w_c, b_c = weight[v0:v1], None if bias is None else bias[v0:v1]  # [Vc, H], [Vc]
        d = d_all[:, : v1 - v0]  # [N, Vc]
        for r0, r1 in _blocks(n, rows):
            z = mm_f32(h[r0:r1], w_c.t(), _view(tile, r1 - r0, v1 - v0))  # [R, Vc]
            grad_tile(z, b_c, targets[r0:r1], v0, lse[r0:r1], q[r0:r1], gs[r0:r1], d[r0:r1], inv_tau)
            if grad_h is not None and v0 == 0:
                mm_f32(d[r0:r1], w_c, grad_h[r0:r1])  # [R, H]
            elif grad_h is not None:
                grad_h[r0:r1].add_(mm_f32(d[r0:r1], w_c, tmp_h[: r1 - r0]))
        if grad_w is not None:
            _grad_w_into(grad_w[v0:v1], d, h, tmp_w)
        if grad_b is not None:
            grad_b[v0:v1] = d.sum(0, dtype=torch.float32)
    grad_h = None if grad_h is None else grad_h.to(h.dtype)
    grad_b = None if grad_b is None else grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


# ----------------------------------------------------------------------------------------------------
# autograd Function and the functional entry


class GemmLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_tau, ignore_index, cfg):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.frozen_head = need_h and not (need_w or need_b)
        keep = targets != ignore_index  # [N]
        t = torch.where(keep, targets, -1)  # −1 never matches a vocabulary column
        out, lse, q, direction = forward(hidden, weight, bias, t, keep, inv_tau, ctx.frozen_head, cfg)
        ctx.inv_tau, ctx.cfg, ctx.hidden_dtype = inv_tau, cfg, hidden.dtype
        if ctx.frozen_head:
            ctx.save_for_backward(direction)
        else:
            ctx.save_for_backward(hidden, weight, bias, t, keep, lse, q)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.frozen_head:
            (direction,) = ctx.saved_tensors
            grad_h = direction * grad_out.float().unsqueeze(1)  # [N, H]: the whole backward is a per-row scale
            return grad_h.to(ctx.hidden_dtype), None, None, None, None, None, None
        hidden, weight, bias, t, keep, lse, q = ctx.saved_tensors
        grads = backward(grad_out, hidden, weight, bias, t, keep, lse, q, ctx.inv_tau, ctx.needs_input_grad[:3],
                         ctx.cfg)
        return (*grads, None, None, None, None)


def gemm_logprob(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100,
                 cfg: GemmConfig | None = None):
    """(..., H), (V, H), (...) → (...) fp32 log-probs of `targets`; ignored positions give 0."""
    if hidden.device.type != "cuda" and not interpreting():
        raise RuntimeError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    cfg = cfg or GemmConfig()
    shape = targets.shape
    dtype = torch.promote_types(hidden.dtype, weight.dtype)  # a GEMM wants one dtype on both sides
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()  # [N, H]
    w = weight.to(dtype).contiguous()  # [V, H]
    t = targets.reshape(-1).long().contiguous()  # [N]
    grads = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, w, bias))
    if not grads:  # reference log-probs: the forward alone, no direction, nothing saved
        keep = t != ignore_index
        out = forward(h, w, bias, torch.where(keep, t, -1), keep, 1.0 / temperature, False, cfg)[0]
    else:
        out = GemmLogprob.apply(h, w, bias, t, 1.0 / temperature, ignore_index, cfg)
    return out.reshape(shape)


__all__ = ["GemmConfig", "backward", "forward", "gemm_logprob", "mm_f32"]
