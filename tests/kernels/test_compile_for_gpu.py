"""Every Triton kernel compiles to a CUDA binary (sm_90, Hopper) on this CPU-only machine.

The interpreter the other CPU tests use runs the kernels as numpy and forgives what the compiler
does not (loop-carried types, constexpr scoping, pointer and dtype rules). Triton's NVIDIA backend
(ptxas included in the wheel) compiles without a GPU, so this catches those errors before a GPU
run does. What the binaries compute is checked by the ``-m gpu`` tests. The compiling happens in a
child process without ``TRITON_INTERPRET`` (the interpreter patches ``triton.language`` in the
process that set it, as the test session does).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import kernels.fused_linear_logprob as flp
import kernels.fused_policy_loss as fpl

HOPPER = GPUTarget("cuda", 90, 32)

_ROW = {"z_ptr": "*bf16", "z_stride": "i32", "tgt_ptr": "*i64"}
CASES = {
    "row_stats": (flp._row_stats_kernel,
                  {**_ROW, "m_ptr": "*fp32", "s_ptr": "*fp32", "ez_ptr": "*fp32", "zt_ptr": "*fp32", "col_limit": "i32",
                   "vocab_start": "i32", "WITH_ENTROPY": "constexpr", "BLOCK_V": "constexpr"},
                  [{"WITH_ENTROPY": True, "BLOCK_V": 4096}, {"WITH_ENTROPY": False, "BLOCK_V": 1024}]),
    "row_grad": (flp._row_grad_kernel,
                 {**_ROW, "lse_ptr": "*fp32", "ent_ptr": "*fp32", "glp_ptr": "*fp32", "gent_ptr": "*fp32",
                  "n_cols": "i32", "col_limit": "i32", "vocab_start": "i32", "WITH_ENTROPY": "constexpr",
                  "BLOCK_V": "constexpr"},
                 [{"WITH_ENTROPY": True, "BLOCK_V": 4096}, {"WITH_ENTROPY": False, "BLOCK_V": 1024}]),
    "reduce_partials": (fpl._reduce_partials_kernel,
                        {"part_ptr": "*fp32", "out_ptr": "*fp32", "num_rows": "i32", "NUM_COLS": "constexpr",
                         "COLS_P2": "constexpr", "COL_MAX": "constexpr", "COL_MIN": "constexpr", "BLOCK_R": "constexpr"},
                        [{"NUM_COLS": 9, "COLS_P2": 16, "COL_MAX": 7, "COL_MIN": 8, "BLOCK_R": 256}]),
    "policy_loss": (fpl._policy_loss_kernel,
                    {"logp_ptr": "*bf16", "old_ptr": "*bf16", "adv_ptr": "*fp32", "mask_ptr": "*u8",
                     "row_scale_ptr": "*fp32", "seq_lr_ptr": "*fp32", "ref_ptr": "*bf16", "grad_ptr": "*bf16",
                     "part_ptr": "*fp32", "n_tokens": "i64", "T": "i32", "ratio_lo": "fp32", "ratio_hi": "fp32",
                     "dual_clip": "fp32", "kl_coef": "fp32", "SEQ_MODE": "constexpr", "DUAL_CLIP": "constexpr",
                     "HAS_KL": "constexpr", "KL_KIND": "constexpr", "KL_ST": "constexpr", "WRITE_GRAD": "constexpr",
                     "NUM_COLS": "constexpr", "BLOCK": "constexpr"},
                    [dict(SEQ_MODE=False, DUAL_CLIP=True, HAS_KL=True, KL_KIND=3, KL_ST=True, WRITE_GRAD=True,
                          NUM_COLS=9, BLOCK=1024),
                     dict(SEQ_MODE=True, DUAL_CLIP=False, HAS_KL=True, KL_KIND=1, KL_ST=False, WRITE_GRAD=False,
                          NUM_COLS=9, BLOCK=1024)]),
}


def compile_case(name: str) -> None:
    fn, signature, variants = CASES[name]
    while hasattr(fn, "fn"):  # down to the Python function (under an autotuner)
        fn = fn.fn
    fn = JITFunction(fn)
    for constexprs in variants:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=HOPPER)
        if not compiled.asm.get("cubin"):
            raise RuntimeError(f"{name} {constexprs}: no binary")


def compile_all() -> None:
    """Child process: compile every case, print one line per case (``ok NAME`` or the error)."""
    import traceback

    for name in CASES:
        try:
            compile_case(name)
            print(f"ok {name}", flush=True)
        except Exception:  # noqa: BLE001 - reported to the parent, which asserts
            print(f"FAILED {name}: " + traceback.format_exc().replace("\n", " | "), flush=True)


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = "from tests.kernels.test_compile_for_gpu import compile_all; compile_all()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok ", "FAILED "))]
    return {line.split()[1].rstrip(":"): line for line in lines} | {"_stderr": proc.stderr[-3000:]}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_compiles_for_hopper(compiled: dict[str, str], name: str) -> None:
    assert compiled.get(name, "").startswith("ok "), compiled.get(name) or compiled["_stderr"]
