"""Rotary positions inside the fused qkv projection: each head's queries and keys turned by their position's
angles (channel i of a head's first half with channel i of its second half), the values copied, one program a
row of (B, T, 3C). The backward is the same kernel turning the other way: a rotation's transpose is its
inverse, and the values' gradient passes through. cos and sin (the angles) take no gradient.
"""
import torch
import triton
import triton.language as tl

from ..ops.reference import check_rotary
from ._common import LaunchConfig, check_device, next_pow2, on_tensor_device


@triton.jit
def _rotary(X, COS, SIN, Y, T, angle_batch_stride, n_head, C, half, turn,
            BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    batch, t = row // T, row % T
    heads = tl.arange(0, BLOCK_HEADS)[:, None]  # the queries' heads, then the keys'
    channels = tl.arange(0, BLOCK_HALF)[None, :]
    in_half = channels < half
    in_bounds = (heads < 2 * n_head) & in_half
    first_at = row * 3 * C + heads * 2 * half + channels
    first = tl.load(X + first_at, mask=in_bounds, other=0.0).to(tl.float32)
    second = tl.load(X + first_at + half, mask=in_bounds, other=0.0).to(tl.float32)
    angle_at = batch * angle_batch_stride + t * half + channels
    cos = tl.load(COS + angle_at, mask=in_half, other=0.0)
    sin = tl.load(SIN + angle_at, mask=in_half, other=0.0) * turn
    tl.store(Y + first_at, (first * cos - second * sin).to(Y.dtype.element_ty), mask=in_bounds)
    tl.store(Y + first_at + half, (first * sin + second * cos).to(Y.dtype.element_ty), mask=in_bounds)
    values = tl.arange(0, BLOCK_C)
    value_at = row * 3 * C + 2 * C + values
    tl.store(Y + value_at, tl.load(X + value_at, mask=values < C), mask=values < C)


def launch_configs(n_head: int, head_dim: int) -> dict:
    """Kernel name -> LaunchConfig for heads of head_dim: every head of a row in one program."""
    return {"_rotary": LaunchConfig(dict(BLOCK_HEADS=next_pow2(2 * n_head), BLOCK_HALF=next_pow2(head_dim // 2),
                                         BLOCK_C=next_pow2(n_head * head_dim)), num_warps=4)}


@on_tensor_device
def turn_queries_keys(qkv, cos, sin, n_head: int, inverse: bool):
    check_device(qkv, cos, sin)
    qkv, cos, sin = qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous()
    B, T, C3 = qkv.shape
    C = C3 // 3
    out = torch.empty_like(qkv)
    if qkv.numel():
        config = launch_configs(n_head, C // n_head)["_rotary"]
        config.launch(_rotary, (B * T,), qkv, cos, sin, out, T, 0 if cos.shape[0] == 1 else T * cos.shape[2],
                      n_head, C, C // n_head // 2, -1.0 if inverse else 1.0)
    return out


class RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head):
        ctx.save_for_backward(cos, sin)
        ctx.n_head = n_head
        return turn_queries_keys(qkv, cos, sin, n_head, False)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return turn_queries_keys(grad_out, cos, sin, ctx.n_head, True), None, None, None


def rotary(qkv, cos, sin, n_head: int):
    """Same signature and results as mingpt.ops.reference.reference_rotary."""
    check_rotary(qkv, cos, sin, n_head)
    return RotaryFn.apply(qkv, cos, sin, n_head)
