"""Layer norm over the last dimension, forward and backward, optionally fused with a residual add.

Each program normalises BLOCK_M rows held as one [BLOCK_M, BLOCK_N] tile, BLOCK_N the power of
two at or above the row width (252 -> 256) with the tail masked on every load and store.
Statistics and arithmetic are in fp32 (fp64 for fp64 inputs); mean and 1/std are saved for the
backward pass.

The backward kernel is persistent: a capped number of programs walk the rows, each writing dx
for its rows and keeping its own partial sums of dweight and dbias in registers; the few
partial rows are folded by one torch sum, so dweight/dbias need no atomics and are
deterministic.

`layer_norm(x, weight, bias, eps)` matches mingpt.ops.reference.reference_layer_norm (the op table's
entry); `add_layer_norm(x, residual, weight, bias, eps)` returns (x + residual,
layer_norm(x + residual)) from one pass over memory, the pre-LN block's residual stream.
"""
import torch
import triton
import triton.language as tl

from ._common import (MAX_ROW_BLOCK, LaunchConfig, acc_dtype, as_rows, check_device, grid_cap, next_pow2,
                      on_tensor_device)


@triton.jit
def _layer_norm_fwd(X, R, S, Y, W, B, Mean, Rstd,
                    M, N, stride_x, stride_r, stride_s, stride_y, eps,
                    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the storage dtype first, as an unfused `x + r` would.
        s = (x.to(ACC) + r.to(ACC)).to(S.dtype.element_ty)
        tl.store(S + r64 * stride_s + cols[None, :], s, mask=mask)
        x = s
    x = x.to(ACC)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)
        y = y + b[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd(DY, X, W, Mean, Rstd, DS, DX, DW_part, DB_part,
                    M, N, stride_dy, stride_x, stride_ds, stride_dx,
                    HAS_DS: tl.constexpr, HAS_W: tl.constexpr,
                    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    dw_acc = tl.zeros([BLOCK_N], dtype=ACC)
    db_acc = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(pid * BLOCK_M, M, n_prog * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + r64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            db_acc += tl.sum(dy, axis=0)
    if COMPUTE_DW:
        tl.store(DW_part + pid * N + cols, dw_acc, mask=col_ok)
    if COMPUTE_DB:
        tl.store(DB_part + pid * N + cols, db_acc, mask=col_ok)


def launch_configs(N: int) -> dict:
    """Kernel name -> LaunchConfig for rows of N elements: a whole row per block, about 4k elements
    per program, forward and backward alike."""
    BLOCK_N = next_pow2(N)
    if BLOCK_N > MAX_ROW_BLOCK:
        raise ValueError(f"layer_norm: rows of {N} elements are wider than this kernel's "
                         f"single block ({MAX_ROW_BLOCK})")
    BLOCK_M = max(1, min(16, 4096 // BLOCK_N))
    config = LaunchConfig(dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N), num_warps=min(max(BLOCK_M * BLOCK_N // 512, 1), 8))
    return {"_layer_norm_fwd": config, "_layer_norm_bwd": config}


def _check_params(N, weight, bias):
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.shape[0] != N):
            raise ValueError(f"layer_norm: {name} must have shape ({N},), got {tuple(p.shape)}")


@on_tensor_device
def layer_norm_forward(x, weight, bias, eps=1e-5, residual=None):
    """Launch the forward kernel. Returns (y, mean, rstd, s): s = x + residual (None without
    a residual), y = layer_norm(s or x); mean and rstd are (rows,) in the accumulation dtype."""
    check_device(x, weight, bias, residual)
    N = x.shape[-1]
    _check_params(N, weight, bias)
    x2 = as_rows(x)
    M = x2.shape[0]
    ACC = acc_dtype(x.dtype)
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(M, dtype=stat_dtype, device=x.device)
    rstd = torch.empty(M, dtype=stat_dtype, device=x.device)
    s = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"add_layer_norm: residual {tuple(residual.shape)} {residual.dtype} "
                             f"differs from x {tuple(x.shape)} {x.dtype}")
        r2 = as_rows(residual)
        s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if M == 0:
        return y, mean, rstd, s
    config = launch_configs(N)["_layer_norm_fwd"]
    y2 = y.view(-1, N)
    s2 = s.view(-1, N) if s is not None else y2
    config.launch(
        _layer_norm_fwd, (triton.cdiv(M, config.blocks["BLOCK_M"]),),
        x2, r2 if residual is not None else x2, s2, y2,
        weight if weight is not None else x2, bias if bias is not None else x2, mean, rstd,
        M, N, x2.stride(0), r2.stride(0) if residual is not None else 0, s2.stride(0), y2.stride(0),
        eps,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, ACC=ACC)
    return y, mean, rstd, s


@on_tensor_device
def layer_norm_backward(dy, x, weight, mean, rstd, ds=None, need_dw=True, need_db=True):
    """Launch the backward kernel. x is the normalised input (the sum, when fused with a
    residual); ds, when given, is added to dx (the gradient reaching the sum directly).
    Returns (dx, dweight or None, dbias or None)."""
    N = x.shape[-1]
    x2 = as_rows(x)
    dy2 = as_rows(dy)
    M = x2.shape[0]
    ACC = acc_dtype(x.dtype)
    part_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    need_dw = need_dw and weight is not None
    p_dtype = weight.dtype if weight is not None else x.dtype
    if M == 0:
        z = torch.zeros(N, dtype=p_dtype, device=x.device)
        return dx, (z if need_dw else None), (z.clone() if need_db else None)
    config = launch_configs(N)["_layer_norm_bwd"]
    n_prog = min(triton.cdiv(M, config.blocks["BLOCK_M"]), grid_cap(x.device))
    dw_part = torch.empty((n_prog, N), dtype=part_dtype, device=x.device) if need_dw else None
    db_part = torch.empty((n_prog, N), dtype=part_dtype, device=x.device) if need_db else None
    dx2 = dx.view(-1, N)
    ds2 = as_rows(ds) if ds is not None else None
    config.launch(
        _layer_norm_bwd, (n_prog,),
        dy2, x2, weight if weight is not None else x2, mean, rstd,
        ds2 if ds2 is not None else dy2, dx2,
        dw_part if need_dw else mean, db_part if need_db else mean,
        M, N, dy2.stride(0), x2.stride(0), ds2.stride(0) if ds2 is not None else 0, dx2.stride(0),
        HAS_DS=ds is not None, HAS_W=weight is not None,
        COMPUTE_DW=need_dw, COMPUTE_DB=need_db, ACC=ACC)
    dw = dw_part.sum(0).to(p_dtype) if need_dw else None
    db = db_part.sum(0).to(p_dtype) if need_db else None
    return dx, dw, db


class LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd, _ = layer_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(
            dy, x, weight, mean, rstd,
            need_dw=ctx.needs_input_grad[1], need_db=ctx.has_bias and ctx.needs_input_grad[2])
        return dx, dw, db, None


class AddLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        y, mean, rstd, s = layer_norm_forward(x, weight, bias, eps, residual=residual)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the sum was used downstream
            return ds, ds, None, None, None
        dsum, dw, db = layer_norm_backward(
            dy, s, weight, mean, rstd, ds=ds,
            need_dw=ctx.needs_input_grad[2], need_db=ctx.has_bias and ctx.needs_input_grad[3])
        return dsum, dsum, dw, db, None


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """Triton layer norm over the last dim; same signature as mingpt.ops.reference.reference_layer_norm."""
    return LayerNormFn.apply(x, weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps: float = 1e-5):
    """(x + residual, layer_norm(x + residual)) in one kernel; gradients flow to both."""
    return AddLayerNormFn.apply(x, residual, weight, bias, eps)
