"""The `cpp` backend of the op table: C++ CPU kernels from mingpt._C (csrc/*.cpp), with autograd.

Each op is one forward and one backward kernel, registered as torch ops `torch.ops.mingpt.*`; the
autograd.Functions here save what the backward needs (layer norm: mean and 1/std; attention and
cross-entropy: the log-sum-exp of each softmax row; dropout: only the seed of its mask). The kernels
take float32 and bfloat16 tensors, compute in float32 and return the dtypes the reference ops return,
under autocast too; parameter gradients come back from C++ in float32 and are cast here to the
parameters' dtypes.
"""
import torch

from .extension import REBUILD_HINT, UNAVAILABLE_REASON, _C
from .ops import check_dropout_rate, check_qkv

if _C is None:
    raise ImportError(UNAVAILABLE_REASON)

KERNELS = ("layer_norm_forward", "layer_norm_backward", "bias_gelu_forward", "bias_gelu_backward",
           "causal_attention_forward", "causal_attention_backward", "cross_entropy_forward",
           "cross_entropy_backward", "dropout")
_missing = [name for name in KERNELS if not hasattr(torch.ops.mingpt, name)]
if _missing:
    raise ImportError(f"mingpt._C is out of date: it lacks the kernels {', '.join(_missing)}; "
                      f"re{REBUILD_HINT}")
_kernels = torch.ops.mingpt


class LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = _kernels.layer_norm_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _kernels.layer_norm_backward(grad_y, x, weight, mean, rstd)
        dweight = None if weight is None else dweight.to(weight.dtype)
        dbias = None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype)
        return dx, dweight, dbias, None


class BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return _kernels.bias_gelu_forward(x, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, bias = ctx.saved_tensors
        dx, dbias = _kernels.bias_gelu_backward(grad_y, x, bias)
        return dx, None if bias is None else dbias.to(bias.dtype)


class CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_head):
        out, lse = _kernels.causal_attention_forward(qkv, n_head)
        ctx.save_for_backward(qkv, lse)
        ctx.n_head = n_head
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, lse = ctx.saved_tensors
        return _kernels.causal_attention_backward(grad_out, qkv, lse, ctx.n_head), None


class CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        loss, lse = _kernels.cross_entropy_forward(logits, targets)
        ctx.save_for_backward(logits, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        return _kernels.cross_entropy_backward(grad_loss, logits, targets, lse), None


class Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return _kernels.dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad_y):
        return _kernels.dropout(grad_y, ctx.p, ctx.seed), None, None


def layer_norm(x, weight, bias, eps: float = 1e-5):
    return LayerNorm.apply(x, weight, bias, eps)


def bias_gelu(x, bias):
    return BiasGelu.apply(x, bias)


def causal_attention(qkv, n_head: int):
    check_qkv(qkv, n_head)
    if torch.is_autocast_enabled("cpu"):
        # The reference's matmuls autocast, so its output has the autocast dtype even for float32 qkv.
        qkv = qkv.to(torch.get_autocast_dtype("cpu"))
    return CausalAttention.apply(qkv, n_head)


def cross_entropy(logits, targets):
    V = logits.size(-1)
    return CrossEntropy.apply(logits.reshape(-1, V), targets.reshape(-1))


def dropout(x, p: float, training: bool):
    check_dropout_rate(p)
    if not training or p == 0.0:
        return x
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return Dropout.apply(x, p, seed)


OPS = {
    "layer_norm": layer_norm,
    "bias_gelu": bias_gelu,
    "causal_attention": causal_attention,
    "cross_entropy": cross_entropy,
    "dropout": dropout,
}
