"""pytest-benchmark rows for the Triton kernels against the reference ops, on a CUDA device.

    pytest benchmarks/test_triton_kernels.py --benchmark-group-by=param:op

One row per (op, backend, pass, dtype) at the seed preset's sizes (batch 32 x block 64,
n_embd 252 in 12 heads of 21, MLP width 1008, a 4,000-token vocabulary). `reference` rows are
the same ops in eager PyTorch on the same GPU, the baseline. Each timed call ends with
torch.cuda.synchronize(), so a row is the kernel's wall time, not its launch time.

Without CUDA every row is skipped, saying why: Triton compiles for GPUs only, and its CPU
interpreter (TRITON_INTERPRET=1, which the tests use to check correctness) runs each program
as a Python loop over numpy arrays, orders of magnitude slower than any real path; a timing of
it would measure the interpreter, so it is never reported as a speed.
"""
import os

import pytest
import torch

from mingpt import ops, reference
from bench import op_pass

SEED = dict(B=32, T=64, C=252, H=12, V=4000)
PASSES = ("forward", "forward+backward")


def triton_skip_reason():
    """None when the Triton rows can run here, else why not."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ("TRITON_INTERPRET=1 is set: Triton's interpreter checks correctness, it is not a "
                "speed path and is never benchmarked")
    if not torch.cuda.is_available():
        return ("no CUDA device: the Triton kernels compile for GPUs only (on a CPU they run solely "
                "in Triton's interpreter, a correctness check that is never reported as a speed)")
    try:
        import mingpt.kernels.op_table  # noqa: F401
    except ImportError as e:
        return f"the Triton kernels cannot be imported: {e}"
    return None


pytestmark = pytest.mark.skipif(triton_skip_reason() is not None, reason=str(triton_skip_reason()))


def make_case(op: str, dtype: torch.dtype, device="cuda"):
    """(inputs, callable builder) for one op at the seed sizes; float inputs require grad."""
    B, T, C, H, V = SEED["B"], SEED["T"], SEED["C"], SEED["H"], SEED["V"]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=g).to(device, dtype).requires_grad_()

    if op == "layer_norm":
        return (rand(B, T, C), rand(C), rand(C))
    if op == "add_layer_norm":
        return (rand(B, T, C), rand(B, T, C), rand(C), rand(C))
    if op == "bias_gelu":
        return (rand(B, T, 4 * C), rand(4 * C))
    if op == "causal_attention":
        return (rand(B, T, 3 * C), H)
    if op == "cross_entropy":
        return (rand(B, T, V), torch.randint(0, V, (B, T), generator=g).to(device))
    if op == "dropout":
        return (rand(B, T, C), 0.1, True)
    raise ValueError(op)


def op_fn(op: str, backend: str):
    if op == "add_layer_norm":
        if backend == "triton":
            from mingpt.kernels.op_table import add_layer_norm
            return add_layer_norm
        return lambda x, r, w, b: (x + r, reference.reference_layer_norm(x + r, w, b))
    if backend == "triton":
        from mingpt.kernels.op_table import OPS
        return OPS[op]
    return ops.REFERENCE_OPS[op]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "bias_gelu", "causal_attention",
                                "cross_entropy", "dropout"])
def test_kernel(benchmark, op, backend, pass_, dtype):
    run = op_pass(op_fn(op, backend), make_case(op, dtype), pass_, torch.cuda.synchronize)
    for _ in range(3):  # compile (triton) and warm the allocator before timing
        run()
    benchmark.group = f"{op} {pass_} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(op=op, backend=backend, pass_=pass_, dtype=str(dtype),
                                device=torch.cuda.get_device_name(), **SEED)
    benchmark(run)
