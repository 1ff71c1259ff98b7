"""The `cpp` backend of the op table: C++ CPU kernels from mingpt._C (csrc/*.cpp), with autograd.

Each op is one forward and one backward kernel, registered in C++ as torch ops `torch.ops.mingpt.*`.
This module registers, for each, a fake kernel (the shapes and dtypes of its outputs, so that
torch.compile traces through it) and, for the forward kernels, the autograd formula calling the
backward kernel. The forwards return what the backwards need (layer norm: mean and 1/std; attention
and cross-entropy: the log-sum-exp of each softmax row); dropout saves only the seed of its mask, an
int64 scalar tensor drawn from torch's RNG, and the backward recomputes the mask from it; rotary's backward
is the same kernel turning the other way (cos and sin, the positions' angles, take no gradient). Attention
over packed rows takes `starts` (B, T), where each position's review begins, as int64 (the op table
converts other integer dtypes and checks the values) and hands it to the backward; it has no gradient.
The kernels take float32 and bfloat16 tensors, compute in float32 and return the dtypes the reference
ops return, under autocast too; parameter gradients come back from C++ in float32 and are cast here to
the parameters' dtypes.
"""
import torch

from .extension import REBUILD_HINT, UNAVAILABLE_REASON, _C
from .reference import check_dropout_rate, check_qkv, check_rotary, check_starts

if _C is None:
    raise ImportError(UNAVAILABLE_REASON)

KERNELS = ("layer_norm_forward", "layer_norm_backward", "bias_gelu_forward", "bias_gelu_backward",
           "causal_attention_forward", "causal_attention_backward", "cross_entropy_forward",
           "cross_entropy_backward", "dropout", "rotary")
# Kernels whose arguments changed: an older build registers them without the argument named here.
SCHEMA_NEEDS = {
    "dropout": ("Tensor seed", "dropout(Tensor x, float p, Tensor seed)"),
    "causal_attention_forward": ("Tensor? starts", "causal_attention_forward(Tensor qkv, int n_head, Tensor? starts)"),
    "causal_attention_backward": ("Tensor? starts",
                                  "causal_attention_backward(Tensor grad_out, Tensor qkv, Tensor lse, int n_head, "
                                  "Tensor? starts)"),
}
_missing = [name for name in KERNELS if not hasattr(torch.ops.mingpt, name)]
if not _missing:
    _missing = [signature for name, (argument, signature) in SCHEMA_NEEDS.items()
                if argument not in str(getattr(torch.ops.mingpt, name).default._schema)]
if _missing:
    raise ImportError(f"mingpt._C is out of date: it lacks the kernels {', '.join(_missing)}; "
                      f"re{REBUILD_HINT}")
_kernels = torch.ops.mingpt


def _float32(x, *shape):
    return x.new_empty(shape, dtype=torch.float32)


# ---------------------------------------------------------------------------- fake kernels

@torch.library.register_fake("mingpt::layer_norm_forward")
def _(x, weight, bias, eps):
    return x.new_empty(x.shape), _float32(x, *x.shape[:-1]), _float32(x, *x.shape[:-1])


@torch.library.register_fake("mingpt::layer_norm_backward")
def _(grad_y, x, weight, mean, rstd):
    return x.new_empty(x.shape), _float32(x, x.shape[-1]), _float32(x, x.shape[-1])


@torch.library.register_fake("mingpt::bias_gelu_forward")
def _(x, bias):
    dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.register_fake("mingpt::bias_gelu_backward")
def _(grad_y, x, bias):
    return x.new_empty(x.shape), _float32(x, x.shape[-1])


@torch.library.register_fake("mingpt::causal_attention_forward")
def _(qkv, n_head, starts=None):
    B, T, C3 = qkv.shape
    return qkv.new_empty((B, T, C3 // 3)), _float32(qkv, B, n_head, T)


@torch.library.register_fake("mingpt::causal_attention_backward")
def _(grad_out, qkv, lse, n_head, starts=None):
    return qkv.new_empty(qkv.shape)


@torch.library.register_fake("mingpt::cross_entropy_forward")
def _(logits, targets):
    return _float32(logits), _float32(logits, logits.shape[0])


@torch.library.register_fake("mingpt::cross_entropy_backward")
def _(grad_loss, logits, targets, lse):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("mingpt::dropout")
def _(x, p, seed):
    return x.new_empty(x.shape)


@torch.library.register_fake("mingpt::rotary")
def _(qkv, cos, sin, n_head, inverse):
    return qkv.new_empty(qkv.shape)


# ---------------------------------------------------------------------------- autograd

def _dtype(param):
    return None if param is None else param.dtype


def _cast_grad(grad, dtype):
    """A float32 parameter gradient from C++ in the parameter's dtype (None where it had no parameter)."""
    return None if dtype is None else grad.to(dtype)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.weight_dtype, ctx.bias_dtype = _dtype(weight), _dtype(bias)


def _layer_norm_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _kernels.layer_norm_backward(grad_y, x, weight, mean, rstd)
    return dx, _cast_grad(dweight, ctx.weight_dtype), _cast_grad(dbias, ctx.bias_dtype), None


def _bias_gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bias_gelu_backward(ctx, grad_y):
    x, bias = ctx.saved_tensors
    dx, dbias = _kernels.bias_gelu_backward(grad_y, x, bias)
    return dx, _cast_grad(dbias, _dtype(bias))


def _attention_setup(ctx, inputs, output):
    qkv, ctx.n_head, starts = inputs
    ctx.save_for_backward(qkv, output[1], starts)


def _attention_backward(ctx, grad_out, grad_lse):
    qkv, lse, starts = ctx.saved_tensors
    return _kernels.causal_attention_backward(grad_out, qkv, lse, ctx.n_head, starts), None, None


def _cross_entropy_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])


def _cross_entropy_backward(ctx, grad_loss, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return _kernels.cross_entropy_backward(grad_loss, logits, targets, lse), None


def _dropout_setup(ctx, inputs, output):
    _, ctx.p, seed = inputs
    ctx.save_for_backward(seed)


def _dropout_backward(ctx, grad_y):
    (seed,) = ctx.saved_tensors
    return _kernels.dropout(grad_y, ctx.p, seed), None, None


def _rotary_setup(ctx, inputs, output):
    _, cos, sin, ctx.n_head, ctx.inverse = inputs
    ctx.save_for_backward(cos, sin)


def _rotary_backward(ctx, grad_out):
    cos, sin = ctx.saved_tensors
    return _kernels.rotary(grad_out, cos, sin, ctx.n_head, not ctx.inverse), None, None, None, None


torch.library.register_autograd("mingpt::layer_norm_forward", _layer_norm_backward, setup_context=_layer_norm_setup)
torch.library.register_autograd("mingpt::bias_gelu_forward", _bias_gelu_backward, setup_context=_bias_gelu_setup)
torch.library.register_autograd("mingpt::causal_attention_forward", _attention_backward,
                                setup_context=_attention_setup)
torch.library.register_autograd("mingpt::cross_entropy_forward", _cross_entropy_backward,
                                setup_context=_cross_entropy_setup)
torch.library.register_autograd("mingpt::dropout", _dropout_backward, setup_context=_dropout_setup)
torch.library.register_autograd("mingpt::rotary", _rotary_backward, setup_context=_rotary_setup)


# ---------------------------------------------------------------------------- the op table

def layer_norm(x, weight, bias, eps: float = 1e-5):
    return _kernels.layer_norm_forward(x, weight, bias, eps)[0]


def bias_gelu(x, bias):
    return _kernels.bias_gelu_forward(x, bias)


def causal_attention(qkv, n_head: int, starts=None):
    check_qkv(qkv, n_head)
    if starts is not None:
        check_starts(starts, qkv)  # the kernels check the values again, under torch.compile too
        starts = starts.long()
    if torch.is_autocast_enabled("cpu"):
        # The reference's matmuls autocast, so its output has the autocast dtype even for float32 qkv.
        qkv = qkv.to(torch.get_autocast_dtype("cpu"))
    return _kernels.causal_attention_forward(qkv, n_head, starts)[0]


def cross_entropy(logits, targets):
    V = logits.size(-1)
    return _kernels.cross_entropy_forward(logits.reshape(-1, V), targets.reshape(-1))[0]


def dropout(x, p: float, training: bool):
    check_dropout_rate(p)
    if not training or p == 0.0:
        return x
    return _kernels.dropout(x, p, torch.randint(0, 2**62, (), dtype=torch.int64))


def rotary(qkv, cos, sin, n_head: int):
    check_rotary(qkv, cos, sin, n_head)
    return _kernels.rotary(qkv, cos.float(), sin.float(), n_head, False)


OPS = {
    "layer_norm": layer_norm,
    "bias_gelu": bias_gelu,
    "causal_attention": causal_attention,
    "cross_entropy": cross_entropy,
    "dropout": dropout,
    "rotary": rotary,
}
