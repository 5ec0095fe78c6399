"""The fused log-prob paths against the naive reference: values and gradients, per dtype.

    pytest tests/test_kernels.py                               # chunked here, triton in a child process
    TRITON_INTERPRET=1 pytest tests/test_kernels.py -k triton  # the triton cases alone, on CPU

`chunked` runs in this process. The `triton` cases (the all-Triton kernels of triton_logprob.py; the
GEMM-fold default of impl="triton" is tests/test_kernels_gemm.py) need TRITON_INTERPRET=1 set before
triton defines the kernels, so `test_triton_under_interpreter` runs them in a child pytest with it set;
in this process they skip. GPU cases (marked `gpu`) compare triton on CUDA at llm-jp-3's vocabulary.
"""

import os
import subprocess
import sys

import pytest
import torch
from lite_selftrain.kernels import ChunkConfig, chunked_logprob, fused_logprob, naive_logprob

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
NORMAL, ODD = (64, 64, 512), (41, 72, 1271)  # (N, H, V): block multiples, and multiples of nothing
# max |error| / max |reference|, about 5x what was observed. Values are fp32 on every path; gradients of
# bf16 inputs are rounded once more by triton (d = g (onehot − p) / τ, and the frozen head's exp(z − m),
# are rounded to bf16 for the tensor cores); fp16's d is kept in fp32
VALUE_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}
GRAD_TOL = {torch.float32: 5e-6, torch.bfloat16: 3e-2, torch.float16: 5e-4}

CASES = [  # (shape, dtype, bias, temperature, trainable weight)
    (ODD, torch.float32, False, 1.0, False),
    (ODD, torch.float32, True, 0.7, True),
    (NORMAL, torch.float32, False, 1.3, True),
    (NORMAL, torch.float32, True, 1.0, False),
    (ODD, torch.bfloat16, True, 1.3, False),
    (NORMAL, torch.bfloat16, False, 1.0, True),
    (ODD, torch.float16, False, 0.7, True),
    (NORMAL, torch.float16, True, 1.0, False),
]
IDS = [f"{'odd' if s == ODD else 'normal'}-{str(d)[6:]}-{'bias' if b else 'nobias'}-tau{t}-"
       f"{'trainW' if w else 'frozenW'}" for s, d, b, t, w in CASES]


def _inputs(shape, dtype, bias, trainable, seed=0):
    """hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) with ignored positions, upstream (N,)."""
    n, h, v = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(dtype).requires_grad_(trainable)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_(trainable) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = -100
    upstream = torch.randn(n, generator=g)  # non-unit, mixed-sign gradient from above
    return hidden, weight, b, targets, upstream


def _run(fn, hidden, weight, bias, targets, upstream, temperature):
    """(values, {name: gradient}) of one path, gradients for whatever requires grad."""
    out = fn(hidden, weight, targets, bias, temperature=temperature)
    named = {k: x for k, x in (("hidden", hidden), ("weight", weight), ("bias", bias))
             if x is not None and x.requires_grad}
    grads = torch.autograd.grad((out * upstream).sum(), list(named.values()))
    return out, dict(zip(named, grads))


def _compare(fn, shape, dtype, bias, temperature, trainable, grad_tol=None):
    hidden, weight, b, targets, upstream = _inputs(shape, dtype, bias, trainable)
    ref, ref_grads = _run(naive_logprob, hidden, weight, b, targets, upstream, temperature)
    out, grads = _run(fn, hidden, weight, b, targets, upstream, temperature)
    assert out.dtype == torch.float32 and out.shape == targets.shape
    assert (out[targets == -100] == 0).all()
    assert (ref - out).abs().max() <= VALUE_TOL[dtype] * ref.abs().max()
    trained = {"weight", "bias"} if bias else {"weight"}
    assert set(grads) == set(ref_grads) == {"hidden"} | (trained if trainable else set())
    for name, r in ref_grads.items():
        g = grads[name]
        assert g.dtype == r.dtype and g.shape == r.shape
        err = (g.float() - r.float()).abs().max() / r.float().abs().max()
        assert err <= (grad_tol or GRAD_TOL)[dtype], f"{name}: relative error {err:.2e}"
    assert (grads["hidden"][targets == -100] == 0).all()  # ignored tokens get no gradient


def _compare_masked_vocab(fn):
    """A bias of −inf bans the first 600 tokens: whole tiles of −inf logits must give 0, not NaN."""
    hidden, weight, _, targets, upstream = _inputs(ODD, torch.float32, False, False)
    bias = torch.zeros(ODD[2])
    bias[:600] = -torch.inf
    targets = torch.where(targets == -100, targets, targets.clamp(min=600))
    ref, ref_grads = _run(naive_logprob, hidden, weight, bias, targets, upstream, 1.0)
    out, grads = _run(fn, hidden, weight, bias, targets, upstream, 1.0)
    assert torch.isfinite(out).all() and torch.isfinite(grads["hidden"]).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads["hidden"], ref_grads["hidden"], atol=1e-5, rtol=1e-4)


def _compare_confident(fn):
    """Targets at each row's argmax, τ = 0.05: 1 − p_t down to 4e-12, where W_t − p_t·W_t would cancel.

    Against a float64 reference (fp32 naive's onehot − p is off by 94 % here); observed 4e-5.
    """
    n, h, v = ODD
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 2 / h**0.5
    targets = (hidden @ weight.t()).argmax(1)
    ref_h = hidden.clone().requires_grad_()
    ref = torch.log_softmax(ref_h @ weight.t() / 0.05, -1).gather(1, targets[:, None]).squeeze(1)
    ref_grad, = torch.autograd.grad(ref.sum(), ref_h)  # (N, H) float64
    h32 = hidden.float().requires_grad_()
    grad, = torch.autograd.grad(fn(h32, weight.float(), targets, temperature=0.05).sum(), h32)
    assert ((grad.double() - ref_grad).norm(dim=1) / ref_grad.norm(dim=1)).max() < 5e-4


# ----------------------------------------------------------------------------------------------------
# chunked, in this process


@pytest.mark.parametrize("shape, dtype, bias, temperature, trainable", CASES, ids=IDS)
def test_chunked_matches_naive(shape, dtype, bias, temperature, trainable):
    _compare(chunked_logprob, shape, dtype, bias, temperature, trainable)


@pytest.mark.parametrize("trainable", [False, True])
def test_chunked_many_tiles(trainable):
    """Tiny tiles: many row blocks and vocab chunks, lazy rescaling with a zero slack, wide logits."""
    cfg = ChunkConfig(tile_elems=300, min_cols=30, gather_rows=7, slack=0.0)
    fn = lambda *a, **k: chunked_logprob(*a, cfg=cfg, **k)
    _compare(fn, ODD, torch.float32, True, 0.5, trainable)


def test_chunked_confident_tokens():
    _compare_confident(chunked_logprob)


def test_chunked_masked_vocabulary():
    cfg = ChunkConfig(tile_elems=41 * 256, min_cols=256)
    _compare_masked_vocab(lambda *a, **k: chunked_logprob(*a, cfg=cfg, **k))


@pytest.mark.parametrize("trainable", [False, True])
def test_chunked_never_holds_the_logits(trainable):
    """The largest tensor any op returns, forward and backward: N·V for naive, one tile for chunked."""
    from torch.overrides import TorchFunctionMode

    class Largest(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, tuple) else (out,):
                if isinstance(x, torch.Tensor):
                    self.numel = max(self.numel, x.numel())
            return out

    n, h, v = 512, 16, 4096
    cfg = ChunkConfig(tile_elems=1 << 16, min_cols=128)  # the logits are 32 tiles
    chunked = lambda *a: chunked_logprob(*a, cfg=cfg)
    for fn, bound in ((naive_logprob, n * v), (chunked, max(cfg.tile_elems, n * h, v * h))):
        hidden, weight, _, targets, upstream = _inputs((n, h, v), torch.float32, False, trainable)
        with Largest() as probe:
            out = fn(hidden, weight, targets)
            (out * upstream).sum().backward()
        assert probe.numel == bound if fn is naive_logprob else probe.numel <= bound < n * v


def test_mixed_dtypes_and_leading_dims():
    hidden = torch.randn(2, 5, 24, requires_grad=True)  # (B, T, H) fp32 against a bf16 head
    weight = torch.randn(300, 24).bfloat16()
    targets = torch.randint(0, 300, (2, 5))
    out = fused_logprob(hidden, weight, targets)
    ref = naive_logprob(hidden, weight, targets)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    g, = torch.autograd.grad(out.sum(), hidden)
    r, = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_logprob(hidden, weight, torch.tensor([1, 2, 10, -100]))
    with pytest.raises(ValueError, match="impl"):
        fused_logprob(hidden, weight, torch.tensor([1, 2, 3, 4]), impl="fast")
    with pytest.raises(ValueError, match="shapes"):
        fused_logprob(hidden, weight, torch.tensor([1, 2, 3]))
    empty = fused_logprob(torch.randn(0, 8), weight, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_no_grad_and_frozen_everything():
    hidden, weight, _, targets, _ = _inputs(ODD, torch.float32, False, False)
    with torch.no_grad():
        out = fused_logprob(hidden, weight, targets)
    torch.testing.assert_close(out, naive_logprob(hidden.detach(), weight, targets), atol=1e-4, rtol=1e-5)
    assert not out.requires_grad


# ----------------------------------------------------------------------------------------------------
# triton under the interpreter: a child process with TRITON_INTERPRET=1 runs the cases below


needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="run by test_triton_under_interpreter")


def _tiles(*args, **kwargs):
    """The all-Triton kernels (`tl.dot` tiles), selectable beside impl="triton"'s GEMM-fold default."""
    from lite_selftrain.kernels.triton_logprob import triton_logprob

    return triton_logprob(*args, **kwargs)


@needs_interpreter
@pytest.mark.parametrize("shape, dtype, bias, temperature, trainable", CASES, ids=IDS)
def test_triton_matches_naive(shape, dtype, bias, temperature, trainable):
    pytest.importorskip("triton")
    _compare(_tiles, shape, dtype, bias, temperature, trainable)


@needs_interpreter
@pytest.mark.parametrize("shape, dtype, bias, temperature, trainable", [c for c in CASES if not c[4]],
                         ids=[i for c, i in zip(CASES, IDS) if not c[4]])
def test_triton_direction_strategy_matches_naive(shape, dtype, bias, temperature, trainable):
    """The frozen head's other strategy (the gradient formed in the forward), which filtering uses."""
    from lite_selftrain.kernels.triton_logprob import TritonConfig, triton_logprob

    cfg = TritonConfig(frozen_head="direction")
    _compare(lambda *a, **k: triton_logprob(*a, cfg=cfg, **k), shape, dtype, bias, temperature, trainable)


@needs_interpreter
def test_triton_masked_vocabulary():
    _compare_masked_vocab(_tiles)


@needs_interpreter
def test_triton_fp16_small_upstream_gradient():
    """g = 1e-5: g · p underflows fp16 (relative error 2e-2 with d in fp16); d is kept in fp32. A small
    budget walks two token blocks and 46 head slices of the fp32 GEMMs."""
    from lite_selftrain.kernels.triton_logprob import TritonConfig, triton_logprob

    hidden, weight, b, targets, upstream = _inputs(ODD, torch.float16, True, True)
    ref, ref_grads = _run(naive_logprob, hidden, weight, b, targets, upstream * 1e-5, 1.0)
    out, grads = _run(lambda *a, **k: triton_logprob(*a, cfg=TritonConfig(backward_elems=1 << 12), **k),
                      hidden, weight, b, targets, upstream * 1e-5, 1.0)
    for name, r in ref_grads.items():
        assert (grads[name].float() - r.float()).abs().max() <= 1e-4 * r.float().abs().max(), name


@needs_interpreter
def test_triton_gradient_filtering_error_is_bounded():
    """Filtering skips frozen-head tiles whose every p_v < eps: per component, the error is at most
    |g_n| / τ · Σ_{v: p_nv < eps} p_nv |W_vk|. Values are untouched; off by default."""
    from lite_selftrain.kernels.triton_logprob import TritonConfig, triton_logprob

    hidden, weight, _, targets, upstream = _inputs(ODD, torch.float32, False, False)
    bias = torch.zeros(ODD[2])
    bias[256:] = -10.0  # a peaked distribution: past the first two tiles every p is tiny
    eps, tau = 1e-2, 1.0
    direction = TritonConfig(frozen_head="direction")
    exact, exact_grads = _run(lambda *a, **k: triton_logprob(*a, cfg=direction, **k),
                              hidden, weight, bias, targets, upstream, tau)
    out, grads = _run(lambda *a, **k: triton_logprob(*a, cfg=TritonConfig(filter_eps=eps), **k),
                      hidden, weight, bias, targets, upstream, tau)
    assert TritonConfig().filter_eps == 0 and TritonConfig(filter_eps=eps).direction()
    assert torch.equal(out, exact)
    p = torch.softmax((hidden.detach().double() @ weight.double().t() + bias.double()) / tau, -1)  # (N, V)
    g = upstream.double().abs() * (targets != -100) / tau
    bound = g[:, None] * ((p * (p < eps)) @ weight.double().abs())  # (N, H)
    err = (grads["hidden"].double() - exact_grads["hidden"].double()).abs()
    assert err.max() > 0, "no tile was skipped"
    assert (err <= bound + 1e-6).all()


@needs_interpreter
def test_triton_confident_tokens():
    _compare_confident(_tiles)


@needs_interpreter
def test_triton_splits_and_row_blocks():
    """One and several vocabulary splits give the same logsumexp and frozen-head gradient direction;
    the trainable head's backward over many token blocks."""
    from lite_selftrain.kernels.triton_logprob import TritonConfig, direction_forward, lse_forward, triton_logprob

    hidden, weight, b, targets, upstream = _inputs(ODD, torch.float32, True, True)
    ref = torch.logsumexp((hidden @ weight.t() + b).detach() / 0.9, dim=-1)
    ref_out, ref_grads = _run(naive_logprob, hidden, weight.detach(), b.detach(), targets, torch.ones(ODD[0]), 0.9)
    keep = targets != -100
    for splits in (1, 3, 100):
        lse, *_ = lse_forward(hidden.detach(), weight.detach(), b.detach(), targets, 1 / 0.9, splits=splits)
        torch.testing.assert_close(lse, ref, atol=1e-4, rtol=1e-5)
        out, direction = direction_forward(hidden.detach(), weight.detach(), b.detach(), targets, keep, 1 / 0.9,
                                           splits=splits)
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(direction, ref_grads["hidden"], atol=1e-5, rtol=1e-4)
    cfg = TritonConfig(backward_elems=1)  # one token block (32 rows) at a time
    _compare(lambda *a, **k: triton_logprob(*a, cfg=cfg, **k), ODD, torch.float32, True, 0.9, True)


def test_triton_under_interpreter():
    """Runs the triton cases above on CPU in a child process (TRITON_INTERPRET must precede import)."""
    pytest.importorskip("triton")
    if INTERPRETING:
        pytest.skip("already the child")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "test_triton_ and not under_interpreter and not on_cuda"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


# ----------------------------------------------------------------------------------------------------
# Cut Cross-Entropy as a second, outside reference for values: its reduction="none" loss is −log-prob


def _cce_values(impl, dtype=torch.float32, device="cpu"):
    """(CCE's per-token loss, our chunked log-prob) on the odd shape, ignored tokens included."""
    cce = pytest.importorskip("cut_cross_entropy")
    hidden, weight, _, targets, _ = _inputs(ODD, dtype, False, False)
    hidden, weight, targets = hidden.detach().to(device), weight.to(device), targets.to(device)
    loss = cce.linear_cross_entropy(hidden, weight, targets, reduction="none", impl=impl)
    return loss.float(), chunked_logprob(hidden, weight, targets)


def test_cce_torch_compile_path_agrees():
    loss, ours = _cce_values("torch_compile")
    torch.testing.assert_close(-loss, ours, atol=1e-5, rtol=1e-6)


def test_cce_triton_kernel_under_interpreter_agrees():
    """CCE's own Triton kernel on CPU, in a child process with TRITON_INTERPRET=1."""
    pytest.importorskip("cut_cross_entropy")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_kernels as t; import torch\n"
            "loss, ours = t._cce_values('cce')\n"
            "torch.testing.assert_close(-loss, ours, atol=1e-5, rtol=1e-6); print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode and "InterpreterError" in proc.stderr and "AssertionError" not in proc.stderr:
        import triton

        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run CCE's kernel: it calls "
                    f"triton.language.extra.libdevice (log1p), which the interpreter does not emulate")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("trainable", [False, True])
def test_triton_on_cuda_llm_jp_vocab(dtype, trainable):
    hidden, weight, _, targets, upstream = _inputs((1000, 512, 99584), dtype, False, trainable)
    hidden = hidden.detach().cuda().requires_grad_()
    weight = weight.detach().cuda().requires_grad_(trainable)
    targets, upstream = targets.cuda(), upstream.cuda()
    ref, ref_grads = _run(naive_logprob, hidden, weight, None, targets, upstream, 1.0)
    out, grads = _run(lambda *a, **k: fused_logprob(*a, impl="triton", **k), hidden, weight, None, targets,
                      upstream, 1.0)
    assert (ref - out).abs().max() <= 1e-3 * ref.abs().max()
    for name, r in ref_grads.items():
        assert (grads[name].float() - r.float()).abs().max() <= GRAD_TOL[dtype] * r.float().abs().max()


@pytest.mark.gpu
def test_cce_triton_kernel_on_cuda_agrees():
    loss, ours = _cce_values("cce", device="cuda")
    torch.testing.assert_close(-loss, ours, atol=1e-4, rtol=1e-5)


def test_importable_and_chunked_without_triton():
    """A machine without triton (macOS): the package imports, and every path but triton runs."""
    code = (
        "import sys\n"
        "class NoTriton:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'triton':\n"
        "            raise ImportError('no triton here')\n"
        "sys.meta_path.insert(0, NoTriton())\n"
        "import torch\n"
        "from lite_selftrain.kernels import fused_logprob, naive_logprob\n"
        "h, w, t = torch.randn(5, 8, requires_grad=True), torch.randn(30, 8), torch.randint(0, 30, (5,))\n"
        "out = fused_logprob(h, w, t)\n"
        "out.sum().backward()\n"
        "assert torch.allclose(out, naive_logprob(h, w, t), atol=1e-5)\n"
        "assert 'triton' not in sys.modules\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
