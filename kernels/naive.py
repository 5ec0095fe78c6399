"""The naive token log-prob: matmul → log_softmax → gather. Every other path is tested against it.

    z = (h · Wᵀ + b) / τ          # [N, V]  — the full logits, which the fused paths never hold
    ℓ_n = z[n, t_n] − logsumexp_v z[n, v]

Memory: the [N, V] logits in fp32 and the log_softmax output of the same size (docs/kernel.md counts them).
"""

from __future__ import annotations

import torch


def naive_logprob(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100, impl="naive"):
    """(..., H), (V, H), (...) → (...) fp32 log-probs of `targets`; ignored positions give 0."""
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1]).float()  # [N, H]
    t = targets.reshape(-1)  # [N]
    logits = h @ weight.float().t()  # [N, V]
    if bias is not None:
        logits = logits + bias.float()
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [N, V]
    keep = t != ignore_index
    out = logp.gather(1, torch.where(keep, t, 0).unsqueeze(1)).squeeze(1)  # [N]
    return torch.where(keep, out, 0.0).reshape(shape)
