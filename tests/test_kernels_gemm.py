"""The GEMM-fold strategy (impl="triton"'s default, kernels/triton_gemm.py) against the naive reference.

    pytest tests/test_kernels_gemm.py                                  # the Triton cases in a child process
    TRITON_INTERPRET=1 pytest tests/test_kernels_gemm.py -k gemm_      # the same cases, in this process

Values and gradients (hidden, weight, bias) over a normal and an odd shape, fp32 / bf16 / fp16, bias,
temperature, ignore_index and a non-unit upstream gradient (the cases of tests/test_kernels.py), once
with the default blocks (one tile at these shapes) and once with tiny blocks (many token blocks and
vocabulary chunks, so the online max, the rescaling of E_p[W] and the per-chunk dW all run). The
Triton folds need TRITON_INTERPRET=1 before triton is imported, so a child pytest runs them; the torch
GEMMs run on CPU as they are.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lite_selftrain.kernels import fused_logprob, naive_logprob

_spec = importlib.util.spec_from_file_location("kernel_cases", Path(__file__).parent / "test_kernels.py")
base = importlib.util.module_from_spec(_spec)  # the cases and comparisons of tests/test_kernels.py
_spec.loader.exec_module(base)
CASES, IDS, ODD = base.CASES, base.IDS, base.ODD
_compare, _compare_confident, _compare_masked_vocab, _inputs, _run = (
    base._compare, base._compare_confident, base._compare_masked_vocab, base._inputs, base._run)

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="run by test_gemm_under_interpreter")
# fp16 frozen head: exp(z − max) is rounded to fp16 for the E_p[W] GEMM, which moves some gradient elements
# by an fp16 ulp from naive's (observed 5e-4 of the largest; against float64 both are off by 3e-4)
TOL = {**base.GRAD_TOL, torch.float16: 1.5e-3}


def _gemm(cfg=None):
    from lite_selftrain.kernels.triton_gemm import GemmConfig, gemm_logprob

    cfg = cfg or GemmConfig()
    return lambda *a, **k: gemm_logprob(*a, cfg=cfg, **k)


def _small():
    """Blocks of 16 tokens × 300 columns: 3 token blocks and 5 chunks at the odd shape, 4 × 2 at the normal."""
    from lite_selftrain.kernels.triton_gemm import GemmConfig

    return GemmConfig(block_n=16, block_v=300, grad_elems=41 * 200, min_cols=100)


@needs_interpreter
@pytest.mark.parametrize("shape, dtype, bias, temperature, trainable", CASES, ids=IDS)
def test_gemm_matches_naive(shape, dtype, bias, temperature, trainable):
    fn = lambda *a, **k: fused_logprob(*a, impl="triton", **k)  # the default strategy, one tile here
    _compare(fn, shape, dtype, bias, temperature, trainable, TOL)


MANY = [1, 3, 4, 6, 7]  # every dtype, frozen and trainable, with bias and τ ≠ 1: the interpreter is slow


@needs_interpreter
@pytest.mark.parametrize("shape, dtype, bias, temperature, trainable", [CASES[i] for i in MANY],
                         ids=[IDS[i] for i in MANY])
def test_gemm_many_tiles_matches_naive(shape, dtype, bias, temperature, trainable):
    _compare(_gemm(_small()), shape, dtype, bias, temperature, trainable, TOL)


@needs_interpreter
@pytest.mark.parametrize("small", [False, True], ids=["one-tile", "many-tiles"])
def test_gemm_confident_tokens(small):
    """1 − p_t down to 4e-12: kept exact through the chunks' rescaling, not recomputed as 1 − p_t."""
    _compare_confident(_gemm(_small() if small else None))


@needs_interpreter
def test_gemm_masked_vocabulary():
    """bias −inf on the first 600 tokens: the first two 300-column chunks hold nothing but −inf logits."""
    _compare_masked_vocab(_gemm(_small()))


@needs_interpreter
def test_gemm_fp16_small_upstream_gradient():
    """g = 1e-5: g · p underflows fp16, so d is kept in fp32 (and its GEMMs run on fp32 operands)."""
    hidden, weight, b, targets, upstream = _inputs(ODD, torch.float16, True, True)
    ref, ref_grads = _run(naive_logprob, hidden, weight, b, targets, upstream * 1e-5, 1.0)
    out, grads = _run(_gemm(_small()), hidden, weight, b, targets, upstream * 1e-5, 1.0)
    for name, r in ref_grads.items():
        assert (grads[name].float() - r.float()).abs().max() <= 1e-4 * r.float().abs().max(), name


@needs_interpreter
def test_gemm_leading_dims_and_mixed_dtypes():
    """(B, T, H) fp32 hidden against a bf16 head: promoted to fp32, the shape of the targets kept."""
    hidden = torch.randn(2, 5, 24, requires_grad=True)
    weight = torch.randn(300, 24).bfloat16()
    targets = torch.randint(0, 300, (2, 5))
    out = fused_logprob(hidden, weight, targets, impl="triton")
    ref = naive_logprob(hidden, weight, targets)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    g, = torch.autograd.grad(out.sum(), hidden)
    r, = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def _fp32_nh_tensors(fn, n, hd):
    """How many [N, H] fp32 tensors torch functions return while `fn` runs (the frozen head's direction)."""
    from torch.overrides import TorchFunctionMode

    class Probe(TorchFunctionMode):
        found = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, tuple) else (out,):
                if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and tuple(x.shape) == (n, hd):
                    Probe.found += 1
            return out

    with Probe():
        out = fn()
    return out, Probe.found


@needs_interpreter
def test_gemm_reference_logprobs_are_forward_only():
    """No grad: the values alone, no [N, H] gradient direction formed; with grad, the same values and the
    direction is formed (so the probe can see one). bf16 inputs, blocks of 16 tokens: the only [N, H] fp32
    tensor the frozen-head forward makes is the direction."""
    hidden, weight, _, targets, _ = _inputs(ODD, torch.bfloat16, False, False)
    fn = _gemm(_small())
    with torch.no_grad():
        out, found = _fp32_nh_tensors(lambda: fn(hidden, weight, targets), ODD[0], ODD[1])
    assert not out.requires_grad and found == 0
    graded, found = _fp32_nh_tensors(lambda: fn(hidden, weight, targets), ODD[0], ODD[1])
    assert graded.requires_grad and found > 0
    assert torch.equal(out, graded.detach())
    torch.testing.assert_close(out, naive_logprob(hidden.detach(), weight, targets), atol=1e-4, rtol=1e-5)


def test_gemm_config_rejects_nonpositive_sizes():
    pytest.importorskip("triton")
    from lite_selftrain.kernels.triton_gemm import GemmConfig

    with pytest.raises(ValueError, match="positive"):
        GemmConfig(block_v=0)


def test_gemm_under_interpreter():
    """Runs the cases above on CPU in a child process (TRITON_INTERPRET must precede import)."""
    pytest.importorskip("triton")
    if INTERPRETING:
        pytest.skip("already the child")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                           __file__, "-k", "test_gemm_ and not under_interpreter and not on_cuda"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("trainable", [False, True])
def test_gemm_on_cuda_many_tiles(dtype, trainable):
    """On CUDA: cuBLAS's 16-bit-in, fp32-out GEMMs (torch.mm out_dtype) and the compiled folds, over
    3 token blocks × 5 vocabulary chunks with a bias and τ = 0.8."""
    from lite_selftrain.kernels.triton_gemm import GemmConfig, _has_out_dtype

    assert _has_out_dtype(), "this torch has no torch.mm(..., out_dtype=torch.float32): the GEMMs upcast"
    hidden, weight, b, targets, upstream = _inputs((1000, 512, 20000), dtype, True, trainable)
    hidden = hidden.detach().cuda().requires_grad_()
    weight, b = weight.detach().cuda().requires_grad_(trainable), b.detach().cuda().requires_grad_(trainable)
    targets, upstream = targets.cuda(), upstream.cuda()
    ref, ref_grads = _run(naive_logprob, hidden, weight, b, targets, upstream, 0.8)
    out, grads = _run(_gemm(GemmConfig(block_n=384, block_v=4096)), hidden, weight, b, targets, upstream, 0.8)
    assert (ref - out).abs().max() <= 1e-4 * ref.abs().max()
    for name, r in ref_grads.items():
        assert (grads[name].float() - r.float()).abs().max() <= TOL[dtype] * r.float().abs().max(), name
