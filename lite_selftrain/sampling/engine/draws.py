"""Counter-based randomness and the token draw: the uniform behind token s of sample j of prompt i is a hash
of (seed, i, j, s), so a prompt's samples do not depend on its batch-mates, the batch size or resuming.

    u = uniforms(seed, prompt_index, sample_index, steps)     # (B, S) in (0, 1)
    tokens = draw(logits, u[:, s], temperature, top_k, top_p)  # (B,)

Used by the native engine (`decode.py`) and, for per-request seeds, by the vLLM backend.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def mix32(x):
    """lowbias32 (C. Wellons), a 32-bit integer hash, on Python ints or int64 tensors without overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x046CA68B + ((x & 1) << 31)) & _M32  # × 0x846CA68B mod 2^32, every product below 2^63
    return x ^ (x >> 16)


def uniforms(seed: int, prompt_index: torch.Tensor, sample_index: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,), (B,) int64 → (B, steps) float32 in (0, 1): a fixed function of (seed, prompt, sample, step)."""
    lanes = []
    for salt in (0x243F6A88, 0x85A308D3):  # two 32-bit lanes: a 64-bit stream key per row
        h = mix32(mix32(mix32(salt ^ (seed & _M32)) ^ ((seed >> 32) & _M32)))
        h = mix32(mix32(h ^ (prompt_index & _M32)) ^ (sample_index & _M32))  # (B,)
        lanes.append(h)
    step = mix32(torch.arange(steps, device=prompt_index.device) + 0x13198A2E)  # (S,)
    bits = mix32(mix32(lanes[0][:, None] ^ step[None, :]) ^ lanes[1][:, None])  # (B, S)
    return ((bits >> 9).float() + 0.5) * 2.0**-23  # 23 bits: exact in float32, never 0 or 1


def draw(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) fp32 logits, (B,) uniforms → (B,) token ids; argmax when temperature is 0.

    Inverse-CDF sampling of softmax(logits / temperature) restricted to the top_k tokens, then to the
    smallest most-likely prefix whose mass reaches top_p: one uniform per row instead of V Gumbel draws.
    """
    if temperature == 0:
        return logits.argmax(-1)
    z, idx = logits, None  # (B, V)
    if top_k and top_k < z.shape[-1]:
        z, idx = z.topk(top_k, dim=-1)  # (B, K), sorted descending; the order is temperature-free
    elif top_p < 1:
        z, idx = z.sort(dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(z / temperature, dim=-1)  # (B, K)
    if top_p < 1:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # keeps at least the top token
    cdf = probs.cumsum(-1)  # (B, K)
    target = (u * cdf[:, -1]).unsqueeze(-1)  # (B, 1), in (0, total]
    pick = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[-1] - 1)  # first cdf >= target: p > 0
    return pick.squeeze(-1) if idx is None else idx.gather(-1, pick).squeeze(-1)
