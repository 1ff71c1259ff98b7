"""Small helpers shared by the kernel launchers (host side only, no kernels here)."""
import contextlib
import dataclasses
import functools

import torch
import triton
import triton.language as tl

# Widest row a single power-of-two block may hold in the row-wise kernels (layer norm):
# 16384 fp32 values spread over 8 warps is 64 registers a thread, the most that still fits.
MAX_ROW_BLOCK = 16384


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How a launcher runs one kernel for a problem shape: its block-size constexprs and Triton's
    num_warps and num_stages (3 is Triton's own default on CUDA). Each kernel file's
    `launch_configs(...)` is the one place these are chosen; the launchers and the ahead-of-time
    compile tests (tests/test_triton_aot.py) both read it."""
    blocks: dict
    num_warps: int = 4
    num_stages: int = 3

    def launch(self, kernel, grid, *args, **constexprs):
        kernel[grid](*args, **constexprs, **self.blocks, num_warps=self.num_warps, num_stages=self.num_stages)


@triton.jit
def _probe():
    pass


def interpreted() -> bool:
    """True when this module's kernels were built for Triton's numpy interpreter: triton.jit
    reads TRITON_INTERPRET when a kernel is defined, so setting it later changes nothing."""
    return not isinstance(_probe, triton.runtime.JITFunction)


def check_device(*tensors):
    """Kernels run on CUDA tensors, or on CPU tensors only under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not interpreted():
            raise RuntimeError(
                f"Triton kernels need CUDA tensors (got a {t.device.type} tensor); on a CPU they "
                "run only in Triton's interpreter, with TRITON_INTERPRET=1 set before triton is imported")


def acc_dtype(dtype: torch.dtype):
    """Accumulate in fp32, or in fp64 for fp64 inputs (gradcheck needs full precision)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype):
    """tl.dot input precision for fp32 operands, following torch's own TF32 switch so a
    Triton matmul is exactly as precise as the torch matmul beside it; other dtypes take
    the default (the setting only applies to fp32 operands)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if dtype == torch.float64:
        return "ieee"
    return None


def grid_cap(device: torch.device, per_sm: int = 4) -> int:
    """How many programs a persistent (loop-over-rows) kernel launches at most: a few per SM
    on a GPU; a handful under the interpreter, where every program is a Python loop."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x as (rows, last dim) with unit stride along the last dim (copies only if it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def on_tensor_device(launcher):
    """Run a launcher with the CUDA device of its first tensor argument current: Triton launches
    on the current device, which need not be the one the tensors live on."""
    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        ctx = (torch.cuda.device(first.device) if first is not None and first.device.type == "cuda"
               else contextlib.nullcontext())
        with ctx:
            return launcher(*args, **kwargs)
    return wrapper
