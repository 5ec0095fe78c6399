"""The chunked token log-prob in pure torch: the CPU default, memory-bounded, and faster than naive when frozen.

    logp = chunked_logprob(hidden, weight, targets, bias, temperature=1.0, ignore_index=-100)

The vocabulary is streamed in chunks: one [rows, Vc] logit tile at a time, folded into an online
logsumexp (Milakov & Gimelshein 2018), never the [N, V] logits. With a frozen head the forward also forms
each token's gradient direction (W[t] − Σ_v p_v W_v) / τ, so the backward is one multiply; with a
trainable head the backward recomputes the tiles. Everything is computed in fp32. The derivations and
measurements: docs/kernel.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkConfig:
    tile_fraction: float = 1 / 64  # logit tile = N·V/64 elements: it scales with N, as naive's [N, V] tensors do
    tile_elems: int = 1 << 24  # but never above 64 MB of fp32, however many tokens
    min_cols: int = 512  # narrower vocab chunks make the GEMMs too thin to run at full speed
    gather_rows: int = 1024  # rows of W[t] gathered at a time when forming the direction (4 MB at H=1024)
    slack: float = 40.0  # the running shift may trail the max by this much: exp(40)·V stays far below fp32's max


# ----------------------------------------------------------------------------------------------------
# helpers


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _tile_shape(n_rows: int, n_vocab: int, cfg: ChunkConfig) -> tuple[int, int]:
    """(rows per block, vocab columns per chunk) so that one logit tile stays within the budget."""
    rows = max(1, min(n_rows, cfg.tile_elems // cfg.min_cols))
    budget = min(cfg.tile_elems, max(cfg.min_cols * rows, int(n_rows * n_vocab * cfg.tile_fraction)))
    cols = max(1, min(n_vocab, budget // rows))
    return rows, cols


def _logit_tile(h, w_c, b_c, inv_tau, out):
    """out (R, Vc) ← (h · w_cᵀ + b_c) / τ, one GEMM written into a preallocated buffer."""
    if b_c is None:
        torch.mm(h, w_c.t(), out=out)
        if inv_tau != 1.0:
            out.mul_(inv_tau)
    else:
        torch.addmm(b_c, h, w_c.t(), beta=inv_tau, alpha=inv_tau, out=out)
    return out


def _targets_in_chunk(t, keep, v0, vc):
    """(local column of each target (R,), whether it falls in chunk [v0, v0 + vc) (R,))."""
    local = t - v0
    inside = keep & (local >= 0) & (local < vc)
    return local.clamp(0, vc - 1), inside


# ----------------------------------------------------------------------------------------------------
# forward: logsumexp, target logits, and (frozen head) the gradient direction


def _forward(h, weight, bias, t, keep, inv_tau, want_direction, cfg):
    """(target log-probs (N,), logsumexp (N,), direction (N, H) or None), all fp32."""
    n, hd = h.shape
    v = weight.shape[0]
    rows, cols = _tile_shape(n, v, cfg)
    buf = torch.empty(rows * cols, dtype=torch.float32, device=h.device)
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    zt = torch.zeros(n, dtype=torch.float32, device=h.device)
    acc = torch.zeros(n, hd, dtype=torch.float32, device=h.device) if want_direction else None  # (N, H)
    other = torch.empty(n, dtype=torch.float32, device=h.device)
    for r0, r1 in _blocks(n, rows):
        h_r = h[r0:r1].float()  # (R, H)
        t_r, keep_r = t[r0:r1], keep[r0:r1]
        m = torch.full((r1 - r0,), -1e30, dtype=torch.float32, device=h.device)  # running shift (R,);
        # finite, so a tile of −inf logits (a masked vocabulary) gives exp(−inf) = 0, not NaN
        so = torch.zeros(r1 - r0, dtype=torch.float32, device=h.device)  # running Σ_{v≠t} exp(z_v − m) (R,)
        for v0, v1 in _blocks(v, cols):
            w_c = weight[v0:v1].float()  # (Vc, H)
            b_c = None if bias is None else bias[v0:v1].float()
            z = _logit_tile(h_r, w_c, b_c, inv_tau, buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0))
            local, inside = _targets_in_chunk(t_r, keep_r, v0, v1 - v0)
            zt[r0:r1] += torch.where(inside, z.gather(1, local.unsqueeze(1)).squeeze(1), 0.0)
            z_max = z.amax(1)
            m_new = torch.where(z_max > m + cfg.slack, z_max, m)  # lazy: the shift moves only when it must
            if v0 > 0 and bool((m_new != m).any()):  # rescale what was summed against the old shift
                scale = torch.exp(m - m_new)  # (R,)
                so.mul_(scale)
                if acc is not None:
                    acc[r0:r1].mul_(scale.unsqueeze(1))
            m = m_new
            z.sub_(m.unsqueeze(1)).exp_()  # (R, Vc) exp(z − m), in place: no second tile
            z.scatter_(1, local.unsqueeze(1), torch.where(inside, 0.0, z.gather(1, local.unsqueeze(1)).squeeze(1))
                       .unsqueeze(1))  # the target's own term is added back exactly below
            so.add_(z.sum(1))
            if acc is not None:
                acc[r0:r1].addmm_(z, w_c)  # Σ_{v≠t} exp(z_v − m) W_v  (R, H)
        s = so + torch.where(keep_r, torch.exp(zt[r0:r1] - m), 0.0)  # Σ_v exp(z_v − m)  (R,)
        lse[r0:r1] = m + torch.log(s)
        if acc is not None:
            acc[r0:r1].div_(s.unsqueeze(1))  # Σ_{v≠t} p_v W_v  (R, H)
            other[r0:r1] = so / s  # Σ_{v≠t} p_v = 1 − p_t without the cancellation when p_t ≈ 1
    out = torch.where(keep, zt - lse, 0.0)
    if acc is not None:  # direction = (W[t] Σ_{v≠t} p_v − Σ_{v≠t} p_v W_v) / τ, zero on ignored tokens
        tc = torch.where(keep, t, 0)
        row_scale = keep.float() * inv_tau
        for r0, r1 in _blocks(n, cfg.gather_rows):
            w_t = weight.index_select(0, tc[r0:r1]).float().mul_(other[r0:r1].unsqueeze(1))  # (R, H)
            acc[r0:r1].sub_(w_t).mul_(-row_scale[r0:r1].unsqueeze(1))
    return out, lse, acc


# ----------------------------------------------------------------------------------------------------
# backward of the trainable-head strategy: recompute each tile from the logsumexp


def _backward_recompute(g, h, weight, bias, t, keep, lse, inv_tau, needs, cfg):
    """(grad_h, grad_W, grad_b) in fp32, each None when not needed; d = g (onehot − p) / τ per tile."""
    need_h, need_w, need_b = needs
    n, hd = h.shape
    v = weight.shape[0]
    rows, cols = _tile_shape(n, v, cfg)
    buf = torch.empty(rows * cols, dtype=torch.float32, device=h.device)
    gs = torch.where(keep, g.float() * inv_tau, 0.0)  # (N,) per-token scale; ignored tokens get none
    grad_h = torch.zeros(n, hd, dtype=torch.float32, device=h.device) if need_h else None
    grad_w = torch.zeros(v, hd, dtype=torch.float32, device=h.device) if need_w else None
    grad_b = torch.zeros(v, dtype=torch.float32, device=h.device) if need_b else None
    for r0, r1 in _blocks(n, rows):
        h_r = h[r0:r1].float()  # (R, H)
        gs_r = gs[r0:r1]
        for v0, v1 in _blocks(v, cols):
            w_c = weight[v0:v1].float()  # (Vc, H)
            b_c = None if bias is None else bias[v0:v1].float()
            d = _logit_tile(h_r, w_c, b_c, inv_tau, buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0))
            d.sub_(lse[r0:r1].unsqueeze(1)).exp_().mul_(-gs_r.unsqueeze(1))  # −g p / τ  (R, Vc)
            local, inside = _targets_in_chunk(t[r0:r1], keep[r0:r1], v0, v1 - v0)
            d.scatter_add_(1, local.unsqueeze(1), torch.where(inside, gs_r, 0.0).unsqueeze(1))  # + g / τ
            if grad_h is not None:
                grad_h[r0:r1].addmm_(d, w_c)  # (R, H)
            if grad_w is not None:
                grad_w[v0:v1].addmm_(d.t(), h_r)  # (Vc, H)
            if grad_b is not None:
                grad_b[v0:v1] += d.sum(0)
    return grad_h, grad_w, grad_b


# ----------------------------------------------------------------------------------------------------
# autograd Function and the functional entry


class ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_tau, ignore_index, cfg):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        frozen_head = need_h and not (need_w or need_b)
        keep = targets != ignore_index  # (N,)
        out, lse, direction = _forward(hidden, weight, bias, targets, keep, inv_tau, frozen_head, cfg)
        ctx.frozen_head, ctx.inv_tau, ctx.cfg, ctx.hidden_dtype = frozen_head, inv_tau, cfg, hidden.dtype
        if frozen_head:
            ctx.save_for_backward(direction)
        elif need_w or need_b or need_h:
            ctx.save_for_backward(hidden, weight, bias, targets, keep, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        needs = ctx.needs_input_grad[:3]
        if ctx.frozen_head:
            (direction,) = ctx.saved_tensors
            grad_h = direction * grad_out.float().unsqueeze(1)  # (N, H): the whole backward is a scale
            return grad_h.to(ctx.hidden_dtype), None, None, None, None, None, None
        hidden, weight, bias, targets, keep, lse = ctx.saved_tensors
        grad_h, grad_w, grad_b = _backward_recompute(grad_out, hidden, weight, bias, targets, keep, lse,
                                                     ctx.inv_tau, needs, ctx.cfg)
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def chunked_logprob(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100,
                    cfg: ChunkConfig | None = None):
    """(..., H), (V, H), (...) → (...) fp32 log-probs of `targets`; ignored positions give 0."""
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    t = targets.reshape(-1).long()  # (N,)
    out = ChunkedLogprob.apply(h, weight, bias, t, 1.0 / temperature, ignore_index, cfg or ChunkConfig())
    return out.reshape(shape)
