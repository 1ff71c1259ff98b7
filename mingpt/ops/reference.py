"""The reference ops: plain PyTorch, the oracle of every test and the baseline of every benchmark,
with the input checks and head layout every backend shares. Imports nothing of mingpt."""
import math

import torch
import torch.nn.functional as F


def check_qkv(qkv: torch.Tensor, n_head: int):
    if qkv.dim() != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"causal_attention expects qkv of shape (B, T, 3*C), got {tuple(qkv.shape)}")
    n_embd = qkv.shape[-1] // 3
    if n_head < 1 or n_embd % n_head:
        raise ValueError(f"causal_attention: C={n_embd} is not divisible by n_head={n_head}")


def split_heads(qkv, n_head: int):
    """q, k, v of shape (B, n_head, T, head_dim) from the fused (B, T, 3*C) projection."""
    check_qkv(qkv, n_head)
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, n_head, C3 // (3 * n_head)).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(y):
    """(B, n_head, T, head_dim) back to (B, T, C)."""
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


def reference_layer_norm(x, weight, bias, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def reference_rms_norm(x, weight, eps: float = 1e-5):
    """In float32 (as autocast runs layer norm), returned in x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps).to(x.dtype)


def reference_bias_gelu(x, bias):
    return F.gelu(x + bias if bias is not None else x, approximate="tanh")


def reference_bias_relu2(x, bias):
    return F.relu(x + bias if bias is not None else x).square()


def check_rotary(qkv, cos, sin, n_head: int):
    if qkv.dim() != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"rotary expects qkv of shape (B, T, 3*C), got {tuple(qkv.shape)}")
    B, T, C3 = qkv.shape
    if n_head < 1 or C3 // 3 % n_head or C3 // 3 // n_head % 2:
        raise ValueError(f"rotary: C={C3 // 3} must split into n_head={n_head} heads of an even size")
    half = C3 // 3 // n_head // 2
    for name, angles in (("cos", cos), ("sin", sin)):
        if angles.dim() != 3 or angles.shape[0] not in (1, B) or tuple(angles.shape[1:]) != (T, half):
            raise ValueError(f"rotary: {name} must have shape (1 or {B}, {T}, {half}), got {tuple(angles.shape)}")


def reference_rotary(qkv, cos, sin, n_head: int):
    """qkv (B, T, 3*C) with each head's queries and keys turned by the angles whose cos and sin are given
    (1 or B, T, head_dim / 2): channel i of a head's first half with channel i of its second half (the
    half-split layout of Llama and GPT-NeoX). The values pass unchanged."""
    check_rotary(qkv, cos, sin, n_head)
    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, n_head, C3 // (3 * n_head)).unbind(2)
    cos, sin = cos[:, :, None].to(qkv.dtype), sin[:, :, None].to(qkv.dtype)

    def turn(x):
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)

    return torch.stack((turn(q), turn(k), v), dim=2).view(B, T, C3)


def check_starts(starts, qkv):
    """`starts` (B, T) integers: where the review that holds each position begins (packed rows); their
    values too (check_start_values), except while torch.compile traces, where they are unknown."""
    if starts is None:
        return
    B, T = qkv.shape[:2]
    if tuple(starts.shape) != (B, T) or starts.dtype.is_floating_point or starts.dtype == torch.bool:
        raise ValueError(f"causal_attention: starts must be integers of shape {(B, T)}, "
                         f"got {starts.dtype} {tuple(starts.shape)}")
    if not torch.compiler.is_compiling():
        check_start_values(starts)


def check_start_values(starts):
    """Each review starts at or before the positions it holds (0 <= starts[b, i] <= i), and a row's
    reviews follow one another (starts does not decrease along T). On a GPU this costs a device sync."""
    before = (starts < 0) | (starts > torch.arange(starts.shape[1], device=starts.device))
    if before.any():
        b, i = before.nonzero()[0].tolist()
        raise ValueError(f"causal_attention: starts[{b}, {i}] = {int(starts[b, i])} is outside 0..{i}: "
                         "a review starts at or before each position it holds")
    falls = starts[:, 1:] < starts[:, :-1]
    if falls.any():
        b, i = falls.nonzero()[0].tolist()
        raise ValueError(f"causal_attention: starts decreases along T at [{b}, {i + 1}] "
                         f"({int(starts[b, i])} then {int(starts[b, i + 1])}): a row's reviews must follow one another")


def visible_keys(starts, T: int, device):
    """The attention mask: query i sees key j where j <= i, and, with `starts`, j >= starts[:, i] (no
    attention across a review boundary). (T, T), or (B, 1, T, T) with starts."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if starts is None:
        return causal
    same_review = torch.arange(T, device=device)[None, None, :] >= starts[:, :, None]
    return (causal & same_review)[:, None]


def reference_causal_attention(qkv, n_head: int, starts=None):
    """Causal self-attention; with `starts` (B, T), a row packs several reviews and each query sees only
    the keys of its own review (positions starts[b, i]..i)."""
    check_starts(starts, qkv)
    q, k, v = split_heads(qkv, n_head)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    att = att.masked_fill(~visible_keys(starts, q.shape[2], qkv.device), float("-inf")).softmax(dim=-1)
    return merge_heads(att @ v)


def check_cache(qkv, k_cache, v_cache, start: int):
    B, T = qkv.shape[:2]
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[0] != B:
        raise ValueError(f"cached_attention: caches of shape {tuple(k_cache.shape)} and {tuple(v_cache.shape)} "
                         f"do not serve a batch of {B} as (B, n_head, block_size, head_dim)")
    if not 0 <= start <= k_cache.shape[2] - T:
        raise ValueError(f"cached_attention: positions {start}..{start + T - 1} are outside the cache of "
                         f"{k_cache.shape[2]} positions")


def check_row_positions(qkv, k_cache, v_cache, positions: torch.Tensor):
    B, T = qkv.shape[:2]
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[0] != B:
        raise ValueError(f"cached_attention: caches of shape {tuple(k_cache.shape)} and {tuple(v_cache.shape)} "
                         f"do not serve a batch of {B} as (B, n_head, block_size, head_dim)")
    if T != 1 or positions.shape != (B,) or positions.dtype != torch.long:
        raise ValueError(f"cached_attention: per-row positions are a LongTensor of shape ({B},) for one query a "
                         f"row, got {tuple(positions.shape)} {positions.dtype} for {T} queries")
    if B and not (0 <= int(positions.min()) and int(positions.max()) < k_cache.shape[2]):
        raise ValueError(f"cached_attention: positions {positions.tolist()} are outside the cache of "
                         f"{k_cache.shape[2]} positions")


def attend_at_row_positions(qkv, n_head: int, k_cache, v_cache, positions: torch.Tensor):
    """One query a row, each at its own position (rows of a running batch that joined at different steps):
    write each row's key and value at its position, then attend to that row's cached positions up to it."""
    check_row_positions(qkv, k_cache, v_cache, positions)
    q, k, v = split_heads(qkv, n_head)
    rows = torch.arange(q.shape[0], device=qkv.device)
    k_cache[rows, :, positions] = k[:, :, 0]
    v_cache[rows, :, positions] = v[:, :, 0]
    end = int(positions.max()) + 1
    visible = torch.arange(end, device=qkv.device) <= positions[:, None]
    return merge_heads(F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end],
                                                      attn_mask=visible[:, None, None, :]))


def reference_cached_attention(qkv, n_head: int, k_cache, v_cache, start):
    """Write this call's keys and values at positions start.. of the caches (B, n_head, block_size, head_dim),
    then attend each query to every cached position up to its own. start: an int, or a LongTensor of each
    row's position for one query a row (attend_at_row_positions)."""
    if isinstance(start, torch.Tensor):
        return attend_at_row_positions(qkv, n_head, k_cache, v_cache, start)
    check_cache(qkv, k_cache, v_cache, start)
    q, k, v = split_heads(qkv, n_head)
    T = q.shape[2]
    end = start + T
    k_cache[:, :, start:end] = k
    v_cache[:, :, start:end] = v
    keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
    if start == 0 or T == 1:  # a prefill from the top left, or one query that sees every cached position
        return merge_heads(F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1))
    visible = torch.ones(T, end, dtype=torch.bool, device=qkv.device).tril(diagonal=start)
    return merge_heads(F.scaled_dot_product_attention(q, keys, values, attn_mask=visible))


def reference_cross_entropy(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=-1)


def check_dropout_rate(p: float):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")


def reference_dropout(x, p: float, training: bool):
    check_dropout_rate(p)
    return F.dropout(x, p, training) if training and p > 0.0 else x


REFERENCE_OPS = {
    "layer_norm": reference_layer_norm,
    "rms_norm": reference_rms_norm,
    "bias_gelu": reference_bias_gelu,
    "bias_relu2": reference_bias_relu2,
    "rotary": reference_rotary,
    "causal_attention": reference_causal_attention,
    "cross_entropy": reference_cross_entropy,
    "dropout": reference_dropout,
    "cached_attention": reference_cached_attention,
}
