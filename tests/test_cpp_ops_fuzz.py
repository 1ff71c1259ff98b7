"""The C++ training ops' entry points under random shapes, dtypes and options: a result or a clear error, never a crash."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("mingpt.ops.cpp", reason="mingpt._C is not built with the C++ training ops")
kernels = torch.ops.mingpt

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.int64])
SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


def tensor(shape, dtype):
    return torch.randint(0, 5, shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape).to(dtype)


def call(op, *args):
    try:
        op(*args)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        assert str(e), "an error must say what is wrong"


@settings(max_examples=60, deadline=None)
@given(SHAPES, DTYPES, st.one_of(st.none(), SHAPES), DTYPES, st.floats(-1, 1))
def test_layer_norm_forward(x_shape, x_dtype, w_shape, w_dtype, eps):
    weight = None if w_shape is None else tensor(w_shape, w_dtype)
    call(kernels.layer_norm_forward, tensor(x_shape, x_dtype), weight, weight, eps)


@settings(max_examples=60, deadline=None)
@given(SHAPES, DTYPES, st.one_of(st.none(), SHAPES))
def test_bias_gelu_forward_and_backward(x_shape, dtype, b_shape):
    x = tensor(x_shape, dtype)
    bias = None if b_shape is None else tensor(b_shape, dtype)
    call(kernels.bias_gelu_forward, x, bias)
    call(kernels.bias_gelu_backward, tensor(x_shape, dtype), x, bias)


@settings(max_examples=60, deadline=None)
@given(SHAPES, DTYPES, st.integers(-2, 8))
def test_causal_attention_forward(shape, dtype, n_head):
    call(kernels.causal_attention_forward, tensor(shape, dtype), n_head)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3), st.integers(0, 9), SHAPES, DTYPES, st.integers(-3, 12), st.integers(0, 2))
def test_causal_attention_with_starts(B, T, starts_shape, starts_dtype, value, position):
    """Good qkv, any starts: the shape and dtype drawn, or the right shape holding one bad value."""
    qkv, n_head = torch.randn(B, T, 3 * 12), 2
    starts = tensor(starts_shape, starts_dtype)
    if position and T:
        starts = torch.zeros(B, T, dtype=torch.long)
        starts[:, T - 1 if position == 1 else T // 2:] = value
    call(kernels.causal_attention_forward, qkv, n_head, starts)
    out, lse = kernels.causal_attention_forward(qkv, n_head)
    call(kernels.causal_attention_backward, torch.randn_like(out), qkv, lse, n_head, starts)


@settings(max_examples=60, deadline=None)
@given(SHAPES, DTYPES, SHAPES, st.integers(-3, 12))
def test_cross_entropy_forward(logit_shape, dtype, target_shape, target_value):
    targets = torch.full(target_shape, target_value, dtype=torch.long)
    call(kernels.cross_entropy_forward, tensor(logit_shape, dtype), targets)
