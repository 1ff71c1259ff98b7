"""The fused backends of the op table (cpp, triton) and how their ops are checked against `reference`.

A Backend names one: its device, the low-precision dtype its kernels are checked in besides fp32,
its tolerances, and its OPS dict, loaded on first use (a backend that cannot run here skips the test,
or the module, saying why). The C++ kernels are checked in bfloat16: it is what CPU autocast and
`--dtype bfloat16` use, and float16 is not a CPU training dtype here (the kernels refuse it by name).
The Triton kernels are checked in float16. Without CUDA they run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton); on a CUDA machine the
same checks run the compiled kernels on the GPU.

How results are compared. The truth is the reference op (mingpt.ops) evaluated in fp64 on the same
inputs; every input and upstream gradient is drawn exactly representable in the low-precision dtype,
so the fp32 and low-precision runs see the very same numbers and the truth carries no rounding of its
own. The error of a tensor is max|actual - truth| / max|truth|: relative to the tensor's own scale,
whatever it is (a cross-entropy gradient of 0.025 is held to the same share of itself as an output of
10), so an element that cancels to near zero (a gradient summed over rows) is judged by the precision
its tensor could have had, not by its own tiny magnitude.

Tolerances, and why:
  fp32  1e-5. fp32's unit roundoff is 6e-8; the kernels sum at most a few thousand terms in fp32 in
        another order than torch, and the C++ kernels' exp (and tanh through it) is within ~2 ulp,
        which bounds the error at a few tens of roundoffs (observed <= 8e-7, torch's own fp32 ops
        <= 6e-7). 1e-5 leaves >10x headroom for a GPU's different reduction order and still catches
        any real mistake (a wrong mask, a missing rescale or a dropped term or block shows up at
        1e-3 or more).
  bf16  (cpp) 2**-7 (7.8e-3), and no worse than 2x torch's own bf16 op + 2**-8. bf16 keeps 8
        significant bits, so rounding a value costs up to half an ulp, 2**-8 = 3.9e-3 of it. The
        kernels compute in fp32 and round each output once, so that rounding is all they lose
        (observed <= 3.9e-3; torch's bf16 ops <= 2.7e-2, its layer norm's weight gradient); 2**-7
        is two half-ulps.
  fp16  (triton) 4e-3, and no worse than 2x torch's own fp16 op + 2**-11. The output's final
        rounding to fp16 alone costs up to half an ulp, 2**-11 = 4.9e-4 of the scale; attention
        also rounds P and dS to fp16 before its matmuls, as FlashAttention does (observed <= 6.2e-4,
        torch's fp16 ops <= 1.4e-3). 4e-3 is 8 half-ulps.
  bf16  (triton, on a GPU only: the interpreter's bf16 tl.dot is wrong) 2**-6, and no worse than 2x
        torch's own bf16 op + 2**-8: the fp16 bound scaled by bf16's 8x coarser half-ulp (2**-8).
        Observed on an H200 (make gpu-check, 2026-12-04): bf16 <= 6.1e-3 (layer norm dx), fp16 <= 5.2e-4
        (attention dqkv), fp32 <= 7.8e-7.
  The comparison with torch's own op in the low-precision dtype says the kernel loses no more
  precision than the op it replaces.
"""
import os
import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

from mingpt import ops

DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Where check_op appends each comparison it makes (one JSON line: backend, op, tensor, dtype, error, tolerance),
# when set: the GPU check (benchmarks/gpu_check.py) reports the largest error per backend and dtype from it.
ERROR_LOG = os.environ.get("MINGPT_OP_ERROR_LOG")


def _load_cpp_ops() -> dict:
    try:
        from mingpt.ops.cpp import OPS
    except ImportError as e:
        pytest.skip(f"the C++ kernels are not available: {e}", allow_module_level=True)
    return OPS


def _load_triton_ops() -> dict:
    pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the kernels cannot run here",
                    allow_module_level=True)
    from mingpt.kernels.op_table import OPS
    return OPS


@dataclass(eq=False)
class Backend:
    name: str
    device: str
    lows: dict  # low-precision dtype checked besides fp32 -> (tolerance, its half-ulp relative to the scale)
    load_ops: Callable[[], dict]
    ops: Optional[dict] = field(default=None, init=False)

    def load(self) -> "Backend":
        """This backend with its OPS loaded; skips the calling test, or module, when it cannot run here."""
        if self.ops is None:
            self.ops = self.load_ops()
        return self

    @property
    def low(self) -> torch.dtype:
        """The first low-precision dtype: the one the mixed-dtype checks use."""
        return next(iter(self.lows))

    @property
    def dtypes(self):
        return (torch.float32, *self.lows)

    @property
    def tol(self) -> dict:
        return {torch.float32: 1e-5, **{dtype: tol for dtype, (tol, _) in self.lows.items()}}

    def rand(self, *shape, scale=1.0, shift=0.0):
        """Normal values rounded to the low-precision dtype, held in fp64: exact in every dtype under test."""
        values = torch.randn(shape, dtype=torch.float64) * scale + shift
        return values.to(self.low).double().to(self.device)

    def check_op(self, op, inputs, dtype, names, kernel=None, fixed=()):
        """The kernel's output and gradients against the fp64 reference, at dtype's tolerance. Inputs at the
        indices `fixed` are passed as they are to every run (constants: no cast, no gradient)."""
        reference = ops.REFERENCE_OPS[op]
        truth_out = reference(*[t.detach() if torch.is_tensor(t) else t for t in inputs])
        grad_out = self.rand(*truth_out.shape)
        truth = run(reference, inputs, torch.float64, grad_out, fixed)
        got = run(kernel or self.ops[op], inputs, dtype, grad_out, fixed)
        assert len(got) == len(truth) == len(names)
        torch_low = run(reference, inputs, dtype, grad_out, fixed) if dtype in self.lows else None
        for i, name in enumerate(names):
            want = torch.float32 if op == "cross_entropy" and i == 0 else dtype  # the loss is fp32
            assert got[i].dtype == want, f"{op} {name}: dtype {got[i].dtype}, expected {want}"
            assert got[i].shape == truth[i].shape, name
            e = err(got[i], truth[i])
            log_error(self.name, op, name, dtype, e, self.tol[dtype])
            assert e <= self.tol[dtype], f"{self.name} {op} {name} ({dtype}): error {e:.2e} > {self.tol[dtype]:.1e}"
            if torch_low is not None:
                bound = 2 * err(torch_low[i], truth[i]) + self.lows[dtype][1]
                assert e <= bound, (f"{self.name} {op} {name} ({dtype}): error {e:.2e} > 2x torch's own op "
                                    f"+ half an ulp ({bound:.2e})")


def log_error(backend: str, op: str, tensor: str, dtype, error: float, tol: float):
    if ERROR_LOG:
        with open(ERROR_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps({"backend": backend, "op": op, "tensor": tensor, "dtype": DTYPE_IDS[dtype],
                                "error": error, "tol": tol}) + "\n")


ON_GPU = torch.cuda.is_available()
TRITON_LOWS = {torch.float16: (4e-3, 2.0 ** -11), **({torch.bfloat16: (2.0 ** -6, 2.0 ** -8)} if ON_GPU else {})}
BACKENDS = {
    "cpp": Backend("cpp", "cpu", {torch.bfloat16: (2.0 ** -7, 2.0 ** -8)}, _load_cpp_ops),
    "triton": Backend("triton", "cuda" if ON_GPU else "cpu", TRITON_LOWS, _load_triton_ops),
}


def run(fn, inputs, dtype, grad_out, fixed=()):
    """fn(*inputs) with the float inputs (but those at the indices `fixed`) cast to dtype as leaves; returns
    [out, grads...]."""
    leaves = [t.detach().to(dtype).requires_grad_() if torch.is_tensor(t) and t.is_floating_point() and i not in fixed
              else t for i, t in enumerate(inputs)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out] + [t.grad for t in leaves if torch.is_tensor(t) and t.requires_grad]


def err(actual, truth):
    """max|actual - truth| / max|truth| (an all-zero truth: the absolute error)."""
    scale = truth.abs().max()
    return ((actual.double() - truth).abs().max() / (scale if scale > 0 else 1.0)).item()
