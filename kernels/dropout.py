"""Inverted dropout with a counter-based mask: element i is kept when tl.rand(seed, i) >= p.

The backward regenerates the mask from the saved seed (Philox is a function of seed and offset),
so no mask is stored; forward and backward are one kernel applied to the input or the gradient.
"""
import torch
import triton
import triton.language as tl

from ._common import LaunchConfig, check_device, on_tensor_device


@triton.jit
def _dropout(X, Y, n, p, scale, seed, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n
    x = tl.load(X + offsets, mask=in_bounds, other=0.0)
    keep = tl.rand(seed, offsets) >= p
    y = tl.where(keep, x.to(tl.float32) * scale, 0.0)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=in_bounds)


def launch_configs() -> dict:
    """Kernel name -> LaunchConfig: 1024 elements a program, whatever the tensor."""
    return {"_dropout": LaunchConfig(dict(BLOCK=1024), num_warps=4)}


@on_tensor_device
def apply_dropout_mask(x, p: float, seed: int):
    check_device(x)
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        config = launch_configs()["_dropout"]
        config.launch(_dropout, (triton.cdiv(x.numel(), config.blocks["BLOCK"]),), x, y, x.numel(), p,
                      1.0 / (1.0 - p), seed)
    return y


class DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return apply_dropout_mask(x, p, seed)

    @staticmethod
    def backward(ctx, dy):
        return apply_dropout_mask(dy, ctx.p, ctx.seed), None, None


def dropout(x, p: float, training: bool):
    """Same signature and distribution as mingpt.ops.reference.reference_dropout; the seed comes from torch's RNG."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    seed = int(torch.randint(0, 2**31 - 1, ()))
    return DropoutFn.apply(x, p, seed)
