"""Triton kernels for the training hot path (installed as mingpt.kernels).

One file per op, each holding its kernels, its torch.autograd.Function and a launcher whose
signature matches the reference op in mingpt.ops:

  layer_norm        layer_norm(x, weight, bias, eps=1e-5); add_layer_norm fuses the residual add
  bias_gelu         bias_gelu(x, bias): bias add + tanh GELU
  causal_attention  causal_attention(qkv, n_head): flash-style, reads q/k/v from the fused qkv
  cross_entropy     cross_entropy(logits, targets): fused softmax + NLL, ignore_index -1

The kernels run on CUDA tensors; on a CPU only in Triton's interpreter (TRITON_INTERPRET=1 set
before triton is imported), which checks correctness and is never a speed path.
"""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as e:  # the op table turns this into BackendUnavailable with the reason
    raise ImportError(f"the Triton kernels need the 'triton' package, which is not importable "
                      f"here ({e}); install it with `pip install triton` (extra: mingpt[triton])") from None

# The submodules keep their names (mingpt.kernels.layer_norm is the module, not the function).
from . import attention, bias_gelu, cross_entropy, layer_norm
from .layer_norm import add_layer_norm

OPS = {
    "layer_norm": layer_norm.layer_norm,
    "bias_gelu": bias_gelu.bias_gelu,
    "causal_attention": attention.causal_attention,
    "cross_entropy": cross_entropy.cross_entropy,
}

__all__ = ["OPS", "add_layer_norm", "attention", "bias_gelu", "cross_entropy", "layer_norm"]
