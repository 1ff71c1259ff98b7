"""Softmax cross entropy over the vocabulary, fused: forward and backward, no softmax in memory.

The forward kernel walks each row's logits in BLOCK_V chunks with an online logsumexp, picks the
target's logit on the way, and writes one loss and one logsumexp per row; the mean over rows
whose target is not -1 (ignore_index, as in the reference) is one torch reduction. The backward
kernel writes dlogits = (softmax - onehot) * grad / n_valid chunk by chunk from the saved
logsumexp, in the logits' dtype; the scale stays a device tensor, so nothing synchronises.

Arithmetic is fp32 whatever the logits' dtype (the reference upcasts with .float()), fp64 for
fp64 logits; the loss is fp32, or fp64 for fp64 logits (so gradcheck can run; the reference's
.float() is there to upcast half precision, not to round fp64 down).
"""
import torch
import triton
import triton.language as tl

from ._common import LaunchConfig, acc_dtype, as_rows, check_device, next_pow2, on_tensor_device


@triton.jit
def _ce_fwd(X, Tgt, Loss, LSE, M, V, stride_x,
            ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    r64 = rows.to(tl.int64)[:, None]
    tgt = tl.load(Tgt + rows, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    x_t = tl.zeros([BLOCK_M], dtype=ACC)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past M stay all -inf
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m_i = m_new
        x_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), axis=1)
    lse = tl.where(row_ok, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)
    loss = tl.where(row_ok & (tgt != -1), lse - x_t, 0.0)
    tl.store(Loss + rows, loss, mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)


@triton.jit
def _ce_bwd(X, Tgt, LSE, G, DX, M, V, stride_x, stride_dx,
            ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    r64 = rows.to(tl.int64)[:, None]
    tgt = tl.load(Tgt + rows, mask=row_ok, other=-1)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    one = tl.arange(0, 16)  # the scale is one element: a masked block load, summed to a scalar
    g = tl.sum(tl.load(G + one, mask=one < 1, other=0.0).to(ACC), axis=0)
    row_scale = tl.where(row_ok & (tgt != -1), g, 0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < V)[None, :]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        p = tl.exp(x - lse[:, None])
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        dx = (p - onehot) * row_scale[:, None]
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


def launch_configs(V: int) -> dict:
    """Kernel name -> LaunchConfig for a vocabulary of V: chunks of at most 2048 logits, about 4k a program."""
    BLOCK_V = min(next_pow2(V), 2048)
    BLOCK_M = max(1, min(16, 4096 // BLOCK_V))
    config = LaunchConfig(dict(BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V), num_warps=4 if BLOCK_M * BLOCK_V <= 4096 else 8)
    return {"_ce_fwd": config, "_ce_bwd": config}


def _prepare(logits, targets):
    check_device(logits, targets)
    V = logits.shape[-1]
    x2 = as_rows(logits)
    t = targets.reshape(-1)
    if t.shape[0] != x2.shape[0]:
        raise ValueError(f"cross_entropy: {x2.shape[0]} rows of logits but {t.shape[0]} targets")
    if t.dtype != torch.int64:
        t = t.long()
    t = t.contiguous()
    ok = ((t >= -1) & (t < V)).all()
    if t.device.type == "cuda":
        torch._assert_async(ok, "cross_entropy: target out of range")  # no host sync
    elif t.numel() and not bool(ok):
        raise IndexError(f"cross_entropy: targets must lie in [0, {V}) or be -1 (ignored)")
    return x2, t, V


class CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    @on_tensor_device
    def forward(ctx, logits, targets):
        x2, t, V = _prepare(logits, targets)
        M = x2.shape[0]
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        loss_rows = torch.empty(M, dtype=out_dtype, device=logits.device)
        lse = torch.empty(M, dtype=out_dtype, device=logits.device)
        if M:
            config = launch_configs(V)["_ce_fwd"]
            config.launch(_ce_fwd, (triton.cdiv(M, config.blocks["BLOCK_M"]),), x2, t, loss_rows, lse, M, V,
                          x2.stride(0), ACC=acc_dtype(logits.dtype))
        n_valid = (t != -1).sum()
        ctx.save_for_backward(x2, t, lse, n_valid)
        ctx.logits_shape = logits.shape
        # 0 / 0 = nan when every target is ignored, as in torch.
        return loss_rows.sum() / n_valid.to(out_dtype)

    @staticmethod
    @on_tensor_device
    def backward(ctx, grad):
        x2, t, lse, n_valid = ctx.saved_tensors
        M, V = x2.shape
        dx = torch.empty((M, V), dtype=x2.dtype, device=x2.device)
        if M:
            g = (grad / n_valid.to(grad.dtype)).reshape(1)
            config = launch_configs(V)["_ce_bwd"]
            config.launch(_ce_bwd, (triton.cdiv(M, config.blocks["BLOCK_M"]),), x2, t, lse, g, dx, M, V,
                          x2.stride(0), dx.stride(0), ACC=acc_dtype(x2.dtype))
        return dx.view(ctx.logits_shape), None


def cross_entropy(logits, targets):
    """Mean cross entropy of logits (..., V) against targets (...), -1 ignored; same signature
    as mingpt.ops.reference.reference_cross_entropy."""
    return CrossEntropyFn.apply(logits, targets)
