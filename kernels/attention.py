"""Causal self-attention, flash style: online softmax, no T x T matrix in memory.

q, k and v are read straight from the fused qkv projection, a (B, T, 3C) tensor, through its
strides: head h of q is columns [h*D, (h+1)*D), of k [C + h*D, ...), of v [2C + h*D, ...). No
copy or transpose of q, k or v is made. The output is written as (B, T, C), heads side by side,
ready for the output projection; the backward pass writes dq, dk and dv into one (B, T, 3C)
gradient in the same layout.

Shapes: any batch, head count and sequence length; any head dim up to 256, padded to a power of
two BLOCK_D >= 16 with masked loads and stores (21 -> 32). Sequence blocks are powers of two
>= 16 (so every tl.dot operand dimension is >= 16); a ragged last block is masked.

Forward (one program per query block and (batch, head)): for each key block at or below the
diagonal, S = q k^T * scale in base-2 units, running max m and running sum l, acc rescaled;
out = acc / l, and the row's logsumexp (base 2) is saved for the backward pass.

Backward (FlashAttention-2): a preprocess kernel computes delta = rowsum(dO * O); then one
program per block index and (batch, head) does two things: for key block j it walks the query
blocks at or after j recomputing P = exp2(S - lse) and accumulates dV += P^T dO and
dK += dS^T q with dS = P * (dO V^T - delta); for query block j it walks the key blocks up to the
diagonal accumulating dQ += dS K. Each output block has one writer: no atomics, deterministic.

Packed rows: with `starts` (B, T), starts[b, i] the position where the review holding position i
begins, query i sees only keys starts[b, i] <= j <= i. The kernels take STARTS (int32, (B, T)
contiguous) under the constexpr HAS_STARTS, so the plain causal kernels compile exactly as without
it. starts never decreases along T, so a block's first query row has its smallest start: the forward
and the dQ loop begin at the key block holding it, and the dK/dV loop of a key block stops at the
first query block whose rows all start after the key block's last key (Q_END, one bound per batch row
and key block, found on the host by a searchsorted over starts: no sync). A query row's first key
blocks may hold no key it sees; the forward's running max then stays -inf, and the update uses 0 in
its place so no inf - inf appears.

Accumulation is fp32 (fp64 for fp64 inputs); P and dS are cast to the input dtype before their
tl.dot, as in FlashAttention. fp32 tl.dot follows torch.backends.cuda.matmul.allow_tf32.
"""
import math

import torch
import triton
import triton.language as tl

from ..ops.reference import check_starts
from ._common import LaunchConfig, acc_dtype, check_device, dot_precision, next_pow2, on_tensor_device

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


@triton.jit
def _attn_fwd(QKV, O, LSE, STARTS, T, H, C, D,
              stride_b, stride_t, stride_c, stride_ob, stride_ot, stride_oc,
              qk_scale,
              HAS_STARTS: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < T
    base = QKV + b.to(tl.int64) * stride_b + (h * D) * stride_c
    q = tl.load(base + offs_m[:, None] * stride_t + offs_d[None, :] * stride_c,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = base + C * stride_c
    v_base = base + 2 * C * stride_c

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)  # causal: no key after the block's last query
    lo = 0
    if HAS_STARTS:
        starts_base = STARTS + b.to(tl.int64) * T
        row_start = tl.load(starts_base + offs_m, mask=m_ok, other=0)
        # The block's first row (always < T) has the smallest start: no key below its key block is seen.
        lo = (tl.load(starts_base + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n < T)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_t + offs_d[None, :] * stride_c,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_t + offs_d[None, :] * stride_c,
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale
        valid = (offs_m[:, None] >= offs_n[None, :]) & (offs_n < T)[None, :]
        if HAS_STARTS:
            valid = valid & (offs_n[None, :] >= row_start[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if HAS_STARTS:
            # A row whose review begins in a later key block sees nothing here: its max stays -inf,
            # and 0 stands in for it so that alpha and p are exp2(-inf) = 0, not exp2(-inf + inf).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            # Without starts every query row sees key 0 in the first block: m_new is finite from then on.
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC).to(ACC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b.to(tl.int64) * stride_ob + offs_m[:, None] * stride_ot
             + (h * D + offs_d[None, :]) * stride_oc,
             acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_preprocess(O, DO, Delta, T, H, D,
                         stride_ob, stride_ot, stride_oc, stride_db, stride_dt, stride_dc,
                         ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    mask = m_ok[:, None] & (offs_d < D)[None, :]
    cols = h * D + offs_d[None, :]
    o = tl.load(O + b.to(tl.int64) * stride_ob + offs_m[:, None] * stride_ot + cols * stride_oc,
                mask=mask, other=0.0).to(ACC)
    do = tl.load(DO + b.to(tl.int64) * stride_db + offs_m[:, None] * stride_dt + cols * stride_dc,
                 mask=mask, other=0.0).to(ACC)
    tl.store(Delta + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, axis=1), mask=m_ok)


@triton.jit
def _load_query_rows(q_base, do_base, lse_base, delta_base, offs_m, T, offs_d, d_ok,
                     stride_t, stride_c, stride_dt, stride_dc):
    """q, dO, log-sum-exp and delta of query rows offs_m (zeros past T), with the row mask and tile mask."""
    m_ok = offs_m < T
    q_mask = m_ok[:, None] & d_ok
    q = tl.load(q_base + offs_m[:, None] * stride_t + offs_d[None, :] * stride_c, mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dt + offs_d[None, :] * stride_dc, mask=q_mask, other=0.0)
    lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
    return m_ok, q_mask, q, do, lse, delta


@triton.jit
def _load_key_rows(k_base, v_base, offs_n, T, offs_d, d_ok, stride_t, stride_c):
    """k and v of key rows offs_n (zeros past T), with the row mask and tile mask."""
    n_ok = offs_n < T
    kv_mask = n_ok[:, None] & d_ok
    k = tl.load(k_base + offs_n[:, None] * stride_t + offs_d[None, :] * stride_c, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_t + offs_d[None, :] * stride_c, mask=kv_mask, other=0.0)
    return n_ok, kv_mask, k, v


@triton.jit
def _attn_bwd_dk_dv(q_base, k_base, v_base, do_base, g_base, lse_base, delta_base, starts_base, hi_m,
                    pid, T, C, D,
                    stride_t, stride_c, stride_dt, stride_dc, stride_gt, stride_gc, sm_scale, qk_scale,
                    HAS_STARTS: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """dK, dV for key block `pid`: walk the query blocks at or below the diagonal, up to hi_m (T, or
    with starts the end of the query rows whose review begins at or before the block's last key)."""
    offs_0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    offs_n = pid * BLOCK + offs_0
    n_ok, kv_mask, k, v = _load_key_rows(k_base, v_base, offs_n, T, offs_d, d_ok, stride_t, stride_c)
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=ACC)
    for start_m in range(pid * BLOCK, hi_m, BLOCK):
        offs_m = start_m + offs_0
        m_ok, _, q, do, lse, delta = _load_query_rows(q_base, do_base, lse_base, delta_base, offs_m, T,
                                                      offs_d, d_ok, stride_t, stride_c, stride_dt, stride_dc)
        # Transposed scores: rows are keys, columns are queries.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC).to(ACC) * qk_scale
        valid_t = (offs_m[None, :] >= offs_n[:, None]) & m_ok[None, :] & n_ok[:, None]
        if HAS_STARTS:
            q_start = tl.load(starts_base + offs_m, mask=m_ok, other=0)
            valid_t = valid_t & (offs_n[:, None] >= q_start[None, :])
        p_t = tl.where(valid_t, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC).to(ACC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC).to(ACC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC).to(ACC)
    dk = dk * sm_scale
    g_cols = offs_d[None, :] * stride_gc
    tl.store(g_base + C * stride_gc + offs_n[:, None] * stride_gt + g_cols, dk.to(g_base.dtype.element_ty),
             mask=kv_mask)
    tl.store(g_base + 2 * C * stride_gc + offs_n[:, None] * stride_gt + g_cols, dv.to(g_base.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _attn_bwd_dq(q_base, k_base, v_base, do_base, g_base, lse_base, delta_base, starts_base, pid, T, D,
                 stride_t, stride_c, stride_dt, stride_dc, stride_gt, stride_gc, sm_scale, qk_scale,
                 HAS_STARTS: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """dQ for query block `pid`: walk the key blocks up to the diagonal (with starts, from the key block
    holding the block's smallest start)."""
    offs_0 = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    offs_m = pid * BLOCK + offs_0
    m_ok, q_mask, q, do, lse, delta = _load_query_rows(q_base, do_base, lse_base, delta_base, offs_m, T,
                                                       offs_d, d_ok, stride_t, stride_c, stride_dt, stride_dc)
    dq = tl.zeros([BLOCK, BLOCK_D], dtype=ACC)
    hi = tl.minimum((pid + 1) * BLOCK, T)
    lo = 0
    if HAS_STARTS:
        row_start = tl.load(starts_base + offs_m, mask=m_ok, other=0)
        lo = (tl.load(starts_base + pid * BLOCK) // BLOCK) * BLOCK
    for start_n in range(lo, hi, BLOCK):
        offs_k = start_n + offs_0
        k_ok, _, k, v = _load_key_rows(k_base, v_base, offs_k, T, offs_d, d_ok, stride_t, stride_c)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC).to(ACC) * qk_scale
        valid = (offs_m[:, None] >= offs_k[None, :]) & k_ok[None, :] & m_ok[:, None]
        if HAS_STARTS:
            valid = valid & (offs_k[None, :] >= row_start[:, None])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC).to(ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC).to(ACC)
    dq = dq * sm_scale
    tl.store(g_base + offs_m[:, None] * stride_gt + offs_d[None, :] * stride_gc, dq.to(g_base.dtype.element_ty),
             mask=q_mask)


@triton.jit
def _attn_bwd(QKV, DO, LSE, Delta, DQKV, STARTS, Q_END, T, H, C, D,
              stride_b, stride_t, stride_c, stride_db, stride_dt, stride_dc,
              stride_gb, stride_gt, stride_gc,
              sm_scale, qk_scale,
              HAS_STARTS: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (pid, batch*head): dK and dV of key block pid, then dQ of query block pid. With starts,
    Q_END (B, cdiv(T, BLOCK)) int32 bounds the query rows that see key block pid."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_base = QKV + b.to(tl.int64) * stride_b + (h * D) * stride_c
    k_base = q_base + C * stride_c
    v_base = q_base + 2 * C * stride_c
    do_base = DO + b.to(tl.int64) * stride_db + (h * D) * stride_dc
    g_base = DQKV + b.to(tl.int64) * stride_gb + (h * D) * stride_gc
    lse_base = LSE + pid_bh.to(tl.int64) * T
    delta_base = Delta + pid_bh.to(tl.int64) * T
    starts_base = STARTS
    hi_m = T
    if HAS_STARTS:
        starts_base = STARTS + b.to(tl.int64) * T
        hi_m = tl.load(Q_END + b * tl.num_programs(0) + pid)
    _attn_bwd_dk_dv(q_base, k_base, v_base, do_base, g_base, lse_base, delta_base, starts_base, hi_m, pid, T, C, D,
                    stride_t, stride_c, stride_dt, stride_dc, stride_gt, stride_gc, sm_scale, qk_scale,
                    HAS_STARTS, ACC, DOT_PREC, BLOCK, BLOCK_D)
    _attn_bwd_dq(q_base, k_base, v_base, do_base, g_base, lse_base, delta_base, starts_base, pid, T, D,
                 stride_t, stride_c, stride_dt, stride_dc, stride_gt, stride_gc, sm_scale, qk_scale,
                 HAS_STARTS, ACC, DOT_PREC, BLOCK, BLOCK_D)


def launch_configs(T: int, D: int, dtype: torch.dtype, block_t=None) -> dict:
    """Kernel name -> LaunchConfig for sequences of T, head dim D and inputs of `dtype`: BLOCK_D the power
    of two >= 16 at or above D; sequence blocks of block_t (a power of two >= 16), else the power of two
    at or above T, from 16 up to 64, or up to 32 where the tiles are large (BLOCK_D >= 128, or fp32 and
    fp64 operands, whose tl.dot runs without half-precision tensor-core tiles); the fp32 backward on 8
    warps. Past these, ptxas spills registers on sm_80 and sm_90 (tests/test_triton_aot.py)."""
    BLOCK_D = max(16, next_pow2(D))
    wide = dtype.itemsize >= 4
    if block_t is None:
        block_t = min(32 if BLOCK_D >= 128 or wide else 64, max(16, next_pow2(T)))
    elif block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"causal_attention: block_t must be a power of two >= 16, got {block_t}")
    return {"_attn_fwd": LaunchConfig(dict(BLOCK_M=block_t, BLOCK_N=block_t, BLOCK_D=BLOCK_D), num_warps=4),
            "_attn_bwd_preprocess": LaunchConfig(dict(BLOCK_M=block_t, BLOCK_D=BLOCK_D), num_warps=4),
            "_attn_bwd": LaunchConfig(dict(BLOCK=block_t, BLOCK_D=BLOCK_D), num_warps=8 if wide else 4)}


def _check(qkv, n_head):
    if qkv.dim() != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"causal_attention expects qkv of shape (B, T, 3*C), got {tuple(qkv.shape)}")
    C = qkv.shape[-1] // 3
    if n_head < 1 or C % n_head:
        raise ValueError(f"causal_attention: C={C} is not divisible by n_head={n_head}")
    D = C // n_head
    if D > MAX_HEAD_DIM:
        raise ValueError(f"causal_attention: head dim {D} is above this kernel's {MAX_HEAD_DIM}")
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"causal_attention: unsupported dtype {qkv.dtype}")
    return C, D


def prepare_starts(starts, qkv):
    """starts checked (integers of shape (B, T) on qkv's device, 0 <= starts[b, i] <= i, never decreasing
    along T) and returned as the kernels read it: int32, contiguous. None stays None."""
    if starts is None:
        return None
    if starts.device != qkv.device:
        raise ValueError(f"causal_attention: starts is on {starts.device}, qkv on {qkv.device}")
    check_starts(starts, qkv)
    return starts.to(torch.int32).contiguous()


def query_ends(starts, T: int, block: int):
    """(B, cdiv(T, block)) int32: for key block n, the end of the query rows whose review begins at or
    before the block's last key (starts is sorted along T, so a searchsorted finds it, with no sync)."""
    last_keys = (torch.arange(triton.cdiv(T, block), device=starts.device, dtype=torch.int32) * block
                 + block - 1).clamp_max(T - 1)
    return torch.searchsorted(starts, last_keys.expand(starts.shape[0], -1).contiguous(), right=True,
                              out_int32=True)


@on_tensor_device
def attention_forward(qkv, n_head, block_t=None, starts=None):
    """Returns (out (B, T, C), lse (B, H, T) base-2 logsumexp of the scaled scores). starts: None, or
    as prepare_starts returns it (int32, (B, T), contiguous, checked)."""
    check_device(qkv)
    C, D = _check(qkv, n_head)
    B, T, _ = qkv.shape
    stat_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    out = torch.empty((B, T, C), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((B, n_head, T), dtype=stat_dtype, device=qkv.device)
    if B * T == 0:
        return out, lse
    config = launch_configs(T, D, qkv.dtype, block_t)["_attn_fwd"]
    grid = (triton.cdiv(T, config.blocks["BLOCK_M"]), B * n_head)
    config.launch(_attn_fwd, grid, qkv, out, lse, starts, T, n_head, C, D,
                  qkv.stride(0), qkv.stride(1), qkv.stride(2),
                  out.stride(0), out.stride(1), out.stride(2),
                  LOG2E * (1.0 / math.sqrt(D)),
                  HAS_STARTS=starts is not None, ACC=acc_dtype(qkv.dtype), DOT_PREC=dot_precision(qkv.dtype))
    return out, lse


@on_tensor_device
def attention_backward(dout, qkv, out, lse, n_head, block_t=None, starts=None):
    """Returns dqkv, (B, T, 3C) in the layout of qkv. starts: as for attention_forward."""
    C, D = _check(qkv, n_head)
    B, T, _ = qkv.shape
    dqkv = torch.empty((B, T, 3 * C), dtype=qkv.dtype, device=qkv.device)
    if B * T == 0:
        return dqkv
    configs = launch_configs(T, D, qkv.dtype, block_t)
    ACC = acc_dtype(qkv.dtype)
    delta = torch.empty_like(lse)
    grid = (triton.cdiv(T, configs["_attn_bwd"].blocks["BLOCK"]), B * n_head)
    configs["_attn_bwd_preprocess"].launch(_attn_bwd_preprocess, grid, out, dout, delta, T, n_head, D,
                                           out.stride(0), out.stride(1), out.stride(2),
                                           dout.stride(0), dout.stride(1), dout.stride(2), ACC=ACC)
    sm_scale = 1.0 / math.sqrt(D)
    q_end = None if starts is None else query_ends(starts, T, configs["_attn_bwd"].blocks["BLOCK"])
    configs["_attn_bwd"].launch(_attn_bwd, grid, qkv, dout, lse, delta, dqkv, starts, q_end, T, n_head, C, D,
                                qkv.stride(0), qkv.stride(1), qkv.stride(2),
                                dout.stride(0), dout.stride(1), dout.stride(2),
                                dqkv.stride(0), dqkv.stride(1), dqkv.stride(2),
                                sm_scale, sm_scale * LOG2E, HAS_STARTS=starts is not None, ACC=ACC,
                                DOT_PREC=dot_precision(qkv.dtype))
    return dqkv


class CausalAttentionFn(torch.autograd.Function):
    """apply(qkv, n_head, starts=None, block_t=None); starts (integer, no gradient) is checked here."""

    @staticmethod
    def forward(ctx, qkv, n_head, starts=None, block_t=None):
        starts = prepare_starts(starts, qkv)
        out, lse = attention_forward(qkv, n_head, block_t, starts)
        ctx.save_for_backward(qkv, out, lse, starts)
        ctx.n_head = n_head
        ctx.block_t = block_t
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse, starts = ctx.saved_tensors
        return attention_backward(dout, qkv, out, lse, ctx.n_head, ctx.block_t, starts), None, None, None


def causal_attention(qkv, n_head: int, starts=None):
    """Causal self-attention from the fused (B, T, 3C) projection to (B, T, C); with starts (B, T), packed
    rows: query i sees keys starts[b, i]..i only. Same signature as
    mingpt.ops.reference.reference_causal_attention."""
    return CausalAttentionFn.apply(qkv, n_head, starts)
