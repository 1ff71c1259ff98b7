"""Where and how a run computes: the device, the dtype and its autocast, the process group torchrun
describes, and malloc keeping the memory a step frees."""
import contextlib
import ctypes
import ctypes.util
import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """auto: CUDA, else Apple's MPS, else the CPU. On MPS the ops resolve to the reference backend
    (the fused kernels are CUDA's and the CPU's)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but torch sees no Apple MPS device")
    return device


def init_distributed(device_name: str):
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Distributed(), resolve_device(device_name)
    dist_info = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist_info, device


# mallopt's parameters (glibc's malloc.h) and the largest mmap threshold it takes on a 64-bit system (32 MiB).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
LARGEST_MMAP_THRESHOLD = 32 << 20


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a training step frees for the next step to reuse. By default it
    gives blocks of a few MiB and more back to the system (mmap'd blocks unmapped, the heap's top trimmed), and
    the next step's tensors of the same sizes fault every page in again: 12 % of the speedrun's CPU step here
    (docs/results.md). Blocks up to 32 MiB then come from the heap, which is never trimmed: the process keeps
    its peak memory. True where it took effect (Linux with glibc); elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def autocast_context(dtype: str, device: torch.device):
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype == "float16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    raise ValueError(f"dtype {dtype!r} is not supported on {device.type}; use float32 or bfloat16")


# dtype auto on a CPU takes bfloat16 where its matmuls run at least this much faster than float32's: CPUs with
# bf16 dot-product instructions (AVX-512 BF16, AMX) run them several times faster, others emulate them far slower.
BF16_MIN_SPEEDUP = 1.5


def resolve_dtype(name: str, device: torch.device) -> tuple:
    """(dtype, why) for a run's --dtype: auto is bfloat16 on a GPU that has it and on a CPU whose bf16
    matmuls are measured faster than its fp32 ones, else float32; other names stand as given."""
    if name != "auto":
        return name, "as asked"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return ("bfloat16" if supported else "float32"), f"auto: bf16 {'' if supported else 'not '}supported here"
    if device.type != "cpu":
        return "float32", f"auto: float32 on {device.type}"
    fp32, bf16 = (matmul_seconds(dtype) for dtype in (torch.float32, torch.bfloat16))
    speedup = fp32 / bf16
    chosen = "bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
    return chosen, f"auto: bf16 matmuls run {speedup:.2f}x fp32's here"


def matmul_seconds(dtype, n: int = 384, repeats: int = 3) -> float:
    """The best of a few n x n products on the CPU."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best
