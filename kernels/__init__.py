"""Token log-probs from hidden states and the lm_head, without materialising [tokens × vocab] logits.

    fused_logprob(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100, impl="auto")

impl: "triton" (CUDA, or CPU under TRITON_INTERPRET=1: cuBLAS GEMMs folded by Triton, `triton_gemm.py`; the
earlier all-Triton kernels stay in `triton_logprob.py`), "chunked" (pure torch, bounded memory), "naive"
(the plain one every other is tested against), "auto" (triton on CUDA when triton is installed, else chunked).
This package imports torch and triton only, and triton only when the triton path runs: on a machine
without it (macOS), everything but impl="triton" works.
"""

import math
import os

import torch

from .chunked import ChunkConfig, chunked_logprob
from .naive import naive_logprob

IMPLS = ("auto", "triton", "chunked", "naive")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what every impl computes with


def _check_targets(targets, keep, vocab: int) -> None:
    bad = keep & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"target {int(targets[bad][0])} is outside the vocabulary [0, {vocab})")


def _check_devices(named: dict) -> None:
    """Every tensor on one device, and one that holds data: a `meta` tensor has no values to compute with."""
    devices = {t.device for t in named.values()}
    if len(devices) > 1 or any(d.type == "meta" for d in devices):
        where = ", ".join(f"{name} on {t.device}" for name, t in named.items())
        raise ValueError(f"tensors must all be on one device that holds data (not meta); got {where}")


def _check_inputs(hidden, weight, targets, bias, temperature, ignore_index) -> None:
    """Float hidden (..., H) and weight (V, H), integer targets (...) in [0, V) or ignore_index, float bias
    (V,), all on one device, a finite temperature > 0: anything else is a TypeError / ValueError saying what
    was expected."""
    named = {"hidden": hidden, "weight": weight, "targets": targets, **({"bias": bias} if bias is not None else {})}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
        if name == "targets" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise TypeError(f"targets must be an integer tensor of token ids, not {t.dtype}")
        if name != "targets" and t.dtype not in FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                            f"not {t.dtype}")
    _check_devices(named)
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[:-1] != targets.shape \
            or weight.shape[-1] != hidden.shape[-1] or (bias is not None and tuple(bias.shape) != weight.shape[:1]):
        raise ValueError(f"shapes do not match: expected hidden (..., H), weight (V, H), targets (...), bias (V,); "
                         f"got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets "
                         f"{tuple(targets.shape)}" + (f", bias {tuple(bias.shape)}" if bias is not None else ""))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an integer token id, not {type(ignore_index).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, not {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, not {temperature}")
    _check_targets(targets, targets != ignore_index, weight.shape[0])


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_logprob(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100, impl="auto"):
    """(..., H), (V, H), (...) → (...) float32 log-probs of `targets`; `ignore_index` positions give 0.

    Differentiable with respect to `hidden`, `weight` and `bias`, each only when it requires grad.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, not {impl!r}")
    _check_inputs(hidden, weight, targets, bias, temperature, ignore_index)
    if impl == "triton" and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1); these are on {hidden.device}")
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and _has_triton() else "chunked"
    if impl == "naive" or targets.numel() == 0:
        return naive_logprob(hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index)
    if impl == "chunked":
        return chunked_logprob(hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index)
    from .triton_gemm import gemm_logprob  # imported here: triton is needed by this path only

    return gemm_logprob(hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index)


__all__ = ["ChunkConfig", "chunked_logprob", "fused_logprob", "naive_logprob"]
