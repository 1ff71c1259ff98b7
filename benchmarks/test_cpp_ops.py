"""pytest-benchmark rows for the C++ CPU kernels (mingpt.ops.cpp) against PyTorch, on the CPU.

    flock /tmp/mingpt-cpu.lock pytest benchmarks/test_cpp_ops.py --benchmark-group-by=group

One row per (op, backend, pass, dtype) at the seed preset's training sizes: batch 32 x block 64,
n_embd 252 in 12 heads of 21, MLP width 1008, the 5k movie reviews' 2,212-character vocabulary.
`reference` rows are the eager PyTorch ops the kernels replace, `sdpa` is torch's
scaled_dot_product_attention. The bf16 rows give each op the dtypes it meets in the model under
`torch.autocast("cpu", torch.bfloat16)`: layer norm the fp32 residual stream, GELU a bf16 matmul
output with an fp32 bias, attention bf16 qkv, the loss bf16 logits, dropout a bf16 projection
output (rate 0.1, the seed preset's). Parameters stay fp32.
"""
import pytest
import torch

from mingpt import ops
from bench import op_pass

try:
    from mingpt.ops.cpp import OPS as CPP_OPS
except ImportError as e:
    pytest.skip(f"the C++ kernels are not available: {e}", allow_module_level=True)

SEED = dict(B=32, T=64, C=252, H=12, V=2212)
PASSES = ("forward", "forward+backward")
BACKENDS = {
    "layer_norm": ("reference", "cpp"),
    "bias_gelu": ("reference", "cpp"),
    "causal_attention": ("reference", "sdpa", "cpp"),
    "cross_entropy": ("reference", "cpp"),
    "dropout": ("reference", "cpp"),
}
CASES = [(op, backend) for op, backends in BACKENDS.items() for backend in backends]


def make_case(op: str, dtype: torch.dtype):
    """Inputs of one call of `op` at the seed sizes, as the model passes them in `dtype` training."""
    B, T, C, H, V = SEED["B"], SEED["T"], SEED["C"], SEED["H"], SEED["V"]
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype).requires_grad_()

    if op == "layer_norm":
        return (rand(B, T, C), rand(C), rand(C))
    if op == "bias_gelu":
        return (rand(B, T, 4 * C, dtype=dtype), rand(4 * C))
    if op == "causal_attention":
        return (rand(B, T, 3 * C, dtype=dtype), H)
    if op == "cross_entropy":
        return (rand(B, T, V, dtype=dtype), torch.randint(0, V, (B, T), generator=g))
    if op == "dropout":
        return (rand(B, T, C, dtype=dtype), 0.1, True)
    raise ValueError(op)


def op_fn(op: str, backend: str):
    if backend == "cpp":
        return CPP_OPS[op]
    if backend == "sdpa":
        return ops.sdpa_causal_attention
    return ops.REFERENCE_OPS[op]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("op,backend", CASES, ids=[f"{op}-{backend}" for op, backend in CASES])
def test_kernel(benchmark, op, backend, pass_, dtype):
    run = op_pass(op_fn(op, backend), make_case(op, dtype), pass_)
    for _ in range(2):
        run()
    benchmark.group = f"{op} {pass_} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(op=op, backend=backend, pass_=pass_, dtype=str(dtype),
                                threads=torch.get_num_threads(), **SEED)
    benchmark(run)
