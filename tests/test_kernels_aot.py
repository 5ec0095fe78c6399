"""The Triton kernels (all-Triton tiles and the GEMM-fold passes) compile ahead of time for sm_80, sm_86,
sm_89 and sm_90, with no GPU present.

    pytest tests/test_kernels_aot.py -s     # -s prints each kernel's registers / spills / shared memory

Each kernel is compiled with the launch configuration the launcher would pick on that architecture,
specialised as Triton's JIT specialises it at the llm-jp-3 shapes (16-byte-aligned pointers, H and the
row strides divisible by 16, an arbitrary token count). ptxas's own report (Triton runs it with -v)
gives registers and spill bytes; they are printed and attached to the test report as properties.
A compile error fails the test, and so does any spill: the launch table promises none.
"""

import contextlib
import io
import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")

ARCHS = [(8, 0), (8, 6), (8, 9), (9, 0)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # fp16 shares bf16's configuration and code
# argument values at H = 2048, V = 99,584 and an odd token count: the JIT marks multiples of 16
SHAPE = dict(N=4097, R=4097, H=2048, V=99584, stride_h=2048, stride_w=2048, stride_d=99584, tiles_per_split=97,
             C=8192, v0=8192, stride_z=8192, stride_s=8192, stride_p=8192)  # + the GEMM-fold tiles [4097, 8192]


def _arg_type(name: str, dtype: str) -> str:
    """Triton type of a runtime argument: pointers to the inputs (and d) have the input dtype."""
    if name == "t_ptr":
        return "*i64"
    if name in ("max_ptr", "sum_ptr", "tgt_ptr", "lse_ptr", "gs_ptr", "part_ptr", "acc_ptr", "q_ptr", "z_ptr",
                "stat_ptr", "scale_ptr"):
        return "*fp32"
    if name.endswith("_ptr"):
        return f"*{dtype}"
    return "fp32" if name in ("inv_tau", "filter_eps", "p_scale") else "i32"


def _launch_and_flags(kernel, cap, dtype_name, flag):
    """(launch config, constexpr arguments) the launchers pick for `kernel` on `cap`."""
    from lite_selftrain.kernels import triton_fold as tf
    from lite_selftrain.kernels import triton_tiles as tt

    if kernel.__name__ in ("_fold_kernel", "_grad_kernel"):  # the GEMM-fold strategy's element-wise passes
        lc = tf.FOLD_LAUNCH if kernel.__name__ == "_fold_kernel" else tf.GRAD_LAUNCH
        consts = dict(HAS_BIAS=True, BLOCK_N=lc.block_n, BLOCK_V=lc.block_v)
        if "WRITE_P" in kernel.arg_names:
            consts["WRITE_P"] = flag
        return lc, consts
    table = tt.DIRECTION_LAUNCH if kernel.__name__ == "_direction_fwd_kernel" else tt.LAUNCH
    lc = tt.arch_config(cap, DTYPES[dtype_name], table)
    consts = dict(HAS_BIAS=True, BLOCK_N=lc.block_n, BLOCK_V=lc.block_v, BLOCK_K=lc.block_k,
                  DOT_PRECISION=tt.dot_precision(DTYPES[dtype_name]), UPCAST=False)
    if "FILTER" in kernel.arg_names:
        consts["FILTER"] = flag
    return lc, consts


def _compile(kernel, cap, dtype_name, tmp_path, monkeypatch, flag=False):
    """(compiled kernel, ptxas log) for one kernel, architecture and dtype."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lc, consts = _launch_and_flags(kernel, cap, dtype_name, flag)
    sig = {name: "constexpr" if name in consts else _arg_type(name, dtype_name) for name in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if sig[name].startswith("*") or (name in SHAPE and SHAPE[name] % 16 == 0)}
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a fresh cache: ptxas really runs
    monkeypatch.setenv("TRITON_DUMP_PTXAS_LOG", "1")  # Triton prints ptxas -v's report
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=aligned),
                                  target=GPUTarget("cuda", cap[0] * 10 + cap[1], 32),
                                  options=dict(num_warps=lc.num_warps, num_stages=lc.num_stages))
    return compiled, log.getvalue(), lc


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("cap", ARCHS, ids=[f"sm_{a}{b}" for a, b in ARCHS])
@pytest.mark.parametrize("kernel_name", ["_lse_fwd_kernel", "_dlogits_kernel", "_direction_fwd_kernel",
                                         "_direction_fwd_kernel+filter", "_fold_kernel", "_fold_kernel+probs",
                                         "_grad_kernel"])
def test_compiles_to_cubin(kernel_name, cap, dtype_name, tmp_path, monkeypatch, record_property):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("ahead-of-time compilation needs TRITON_INTERPRET unset")
    from lite_selftrain.kernels import triton_fold, triton_logprob

    name = kernel_name.split("+")[0]
    kernel = getattr(triton_fold if name in ("_fold_kernel", "_grad_kernel") else triton_logprob, name)
    compiled, log, lc = _compile(kernel, cap, dtype_name, tmp_path, monkeypatch, "+" in kernel_name)
    assert compiled.asm["cubin"][:4] == b"\x7fELF"
    assert ".entry" in compiled.asm["ptx"]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    spills = [(int(s), int(l)) for s, l in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    assert regs and spills, f"no ptxas report in:\n{log}"
    report = dict(registers=regs[0], spill_stores=spills[0][0], spill_loads=spills[0][1],
                  shared_bytes=compiled.metadata.shared, config=str(lc))
    for key, value in report.items():
        record_property(key, value)
    print(f"\n{kernel_name} sm_{cap[0]}{cap[1]} {dtype_name}: {report}")
    assert regs[0] <= 255
    assert spills[0] == (0, 0), f"{kernel_name} spills on sm_{cap[0]}{cap[1]} {dtype_name}: {report}"
