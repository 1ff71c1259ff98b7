"""Bias add + GELU (tanh approximation), forward and backward, fused.

The MLP's up-projection runs as a bias-free matmul; this kernel adds the linear layer's bias
and applies GELU in the same pass, so the pre-activation is never written. The backward pass
recomputes the pre-activation from the saved matmul output and the bias, writes dx, and sums
dbias per column: a capped number of programs walk the rows keeping partial column sums in
registers, folded by one torch sum (deterministic, no atomics).

gelu(z) = 0.5 z (1 + tanh(k (z + 0.044715 z^3))), k = sqrt(2/pi), evaluated in fp32 (fp64 for
fp64 inputs); tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|), which never
overflows and saturates cleanly to +-1 at both ends.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import LaunchConfig, acc_dtype, as_rows, check_device, grid_cap, next_pow2, on_tensor_device

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@triton.jit
def _tanh(u):
    # exp of a non-positive argument only: no overflow at either end
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _bias_gelu_fwd(X, B, Y, M, N, stride_x, stride_y,
                   HAS_B: tl.constexpr, ACC: tl.constexpr, K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    z = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_B:
        z += tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    t = _tanh(K * (z + 0.044715 * z * z * z))
    y = 0.5 * z * (1.0 + t)
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd(DY, X, B, DX, DB_part, M, N, stride_dy, stride_x, stride_dx,
                   HAS_B: tl.constexpr, COMPUTE_DB: tl.constexpr, ACC: tl.constexpr,
                   K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_prog_m = tl.num_programs(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_B:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)
    db_acc = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(pid_m * BLOCK_M, M, n_prog_m * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        z = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        if HAS_B:
            z += b[None, :]
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        z2 = z * z
        t = _tanh(K * (z + 0.044715 * z2 * z))
        dgelu = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * K * (1.0 + 3.0 * 0.044715 * z2)
        dx = tl.where(mask, dy * dgelu, 0.0)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DB:
            db_acc += tl.sum(dx, axis=0)
    if COMPUTE_DB:
        tl.store(DB_part + pid_m * N + cols, db_acc, mask=col_ok)


def launch_configs(N: int) -> dict:
    """Kernel name -> LaunchConfig for rows of N elements: tiles of about 4k elements, at most 1024 wide;
    the backward, which holds more per element, on 8 warps (on 4 ptxas spills on sm_90)."""
    blocks = dict(BLOCK_M=max(1, min(64, 4096 // min(next_pow2(N), 1024))), BLOCK_N=min(next_pow2(N), 1024))
    return {"_bias_gelu_fwd": LaunchConfig(blocks, num_warps=4), "_bias_gelu_bwd": LaunchConfig(blocks, num_warps=8)}


@on_tensor_device
def bias_gelu_forward(x, bias):
    check_device(x, bias)
    N = x.shape[-1]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise ValueError(f"bias_gelu: bias must have shape ({N},), got {tuple(bias.shape)}")
    x2 = as_rows(x)
    M = x2.shape[0]
    # x + bias promotes as in the reference (fp16 matmul output + fp32 bias under autocast -> fp32)
    out_dtype = torch.promote_types(x.dtype, bias.dtype) if bias is not None else x.dtype
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    y2 = y.view(-1, N)
    config = launch_configs(N)["_bias_gelu_fwd"]
    grid = (triton.cdiv(M, config.blocks["BLOCK_M"]), triton.cdiv(N, config.blocks["BLOCK_N"]))
    config.launch(_bias_gelu_fwd, grid, x2, bias if bias is not None else x2, y2, M, N, x2.stride(0), y2.stride(0),
                  HAS_B=bias is not None, ACC=acc_dtype(x.dtype), K=SQRT_2_OVER_PI)
    return y


@on_tensor_device
def bias_gelu_backward(dy, x, bias, need_db=True):
    """Returns (dx, dbias or None)."""
    N = x.shape[-1]
    x2 = as_rows(x)
    dy2 = as_rows(dy)
    M = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    need_db = need_db and bias is not None
    if M == 0 or N == 0:
        return dx, (torch.zeros_like(bias) if need_db else None)
    dx2 = dx.view(-1, N)
    config = launch_configs(N)["_bias_gelu_bwd"]
    n_col = triton.cdiv(N, config.blocks["BLOCK_N"])
    n_row = min(triton.cdiv(M, config.blocks["BLOCK_M"]), max(1, grid_cap(x.device) // n_col))
    part_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    db_part = torch.empty((n_row, N), dtype=part_dtype, device=x.device) if need_db else None
    config.launch(
        _bias_gelu_bwd, (n_row, n_col),
        dy2, x2, bias if bias is not None else x2, dx2, db_part if need_db else dx2,
        M, N, dy2.stride(0), x2.stride(0), dx2.stride(0),
        HAS_B=bias is not None, COMPUTE_DB=need_db, ACC=acc_dtype(x.dtype), K=SQRT_2_OVER_PI)
    db = db_part.sum(0).to(bias.dtype) if need_db else None
    return dx, db


class BiasGeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return bias_gelu_forward(x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, db = bias_gelu_backward(dy, x, bias, need_db=ctx.needs_input_grad[1])
        return dx, db


def bias_gelu(x, bias):
    """gelu_tanh(x + bias) over the last dim; same signature as mingpt.ops.reference.reference_bias_gelu."""
    return BiasGeluFn.apply(x, bias)
