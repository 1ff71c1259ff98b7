"""The triton backend of the op table (mingpt.ops imports this module and reads OPS)."""

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as e:  # the op table turns this into BackendUnavailable with the reason
    raise ImportError(f"the Triton kernels need the 'triton' package, which is not importable "
                      f"here ({e}); install it with `pip install triton` (extra: mingpt[triton])") from None

# The submodules keep their names (mingpt.kernels.layer_norm is the module, not the function).
from . import attention, bias_gelu, cross_entropy, dropout, layer_norm, rotary
from .layer_norm import add_layer_norm

OPS = {
    "layer_norm": layer_norm.layer_norm,
    "bias_gelu": bias_gelu.bias_gelu,
    "causal_attention": attention.causal_attention,
    "cross_entropy": cross_entropy.cross_entropy,
    "dropout": dropout.dropout,
    "rotary": rotary.rotary,
}
