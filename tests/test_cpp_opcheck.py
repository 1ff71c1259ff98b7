"""The C++ ops as torch.compile sees them: torch.library.opcheck on every op (its schema, fake kernel,
autograd registration and an AOT-traced run), and a compiled GPT on the cpp backend against eager.

The numerical checks of the kernels against the reference ops are in tests/test_fused_ops.py and
tests/test_cpp_ops.py; opcheck compares each fake kernel's outputs (shapes, dtypes, strides) with the
real kernel's on the same inputs. Shapes: width 252 (the seed preset's), head dim 21, T = 1, 17, 64,
with and without the optional parameters (attention: packed rows' starts).
"""
import pytest
import torch

from mingpt import GPT, GPTConfig
from op_check import BACKENDS

BACKENDS["cpp"].load()
kernels = torch.ops.mingpt


def leaf(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def opcheck(op, args):
    torch.library.opcheck(op, args)


def check_backward(op, args):
    """A backward kernel is not differentiable itself: its inputs are checked without autograd history."""
    opcheck(op, tuple(a.detach() if torch.is_tensor(a) else a for a in args))


@pytest.mark.parametrize("T", [1, 17, 64])
@pytest.mark.parametrize("affine", ["weight_and_bias", "weight_only", "none"])
def test_layer_norm(T, affine):
    C = 252
    weight = leaf(C) if affine != "none" else None
    bias = leaf(C) if affine == "weight_and_bias" else None
    x = leaf(2, T, C)
    opcheck(kernels.layer_norm_forward, (x, weight, bias, 1e-5))
    y, mean, rstd = kernels.layer_norm_forward(x, weight, bias, 1e-5)
    check_backward(kernels.layer_norm_backward, (torch.randn_like(y), x, weight, mean, rstd))


@pytest.mark.parametrize("T", [1, 17, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(T, with_bias):
    N = 4 * 252
    x, bias = leaf(2, T, N), leaf(N) if with_bias else None
    opcheck(kernels.bias_gelu_forward, (x, bias))
    check_backward(kernels.bias_gelu_backward, (torch.randn(2, T, N), x, bias))


def packed_starts(B, T, review=5):
    """Reviews of `review` tokens back to back (the last cut short): where each position's begins."""
    return (torch.arange(T) // review * review).expand(B, T).contiguous()


@pytest.mark.parametrize("T", [1, 17, 64])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_causal_attention(T, packed):
    n_head, C = 12, 252  # head dim 21
    qkv = leaf(2, T, 3 * C)
    starts = (packed_starts(2, T),) if packed else ()
    opcheck(kernels.causal_attention_forward, (qkv, n_head, *starts))
    out, lse = kernels.causal_attention_forward(qkv, n_head, *starts)
    check_backward(kernels.causal_attention_backward, (torch.randn_like(out), qkv, lse, n_head, *starts))


@pytest.mark.parametrize("rows", [1, 17, 64])
def test_cross_entropy(rows):
    V = 53
    logits, targets = leaf(rows, V), torch.randint(V, (rows,))
    targets[0] = -1 if rows > 1 else targets[0]  # an ignored row
    opcheck(kernels.cross_entropy_forward, (logits, targets))
    loss, lse = kernels.cross_entropy_forward(logits, targets)
    check_backward(kernels.cross_entropy_backward, (torch.tensor(1.0), logits, targets, lse))


@pytest.mark.parametrize("T", [1, 17, 64])
def test_dropout(T):
    opcheck(kernels.dropout, (leaf(2, T, 252), 0.3, torch.tensor(1234)))


@pytest.mark.parametrize("T", [1, 17, 64])
@pytest.mark.parametrize("angle_rows", [1, 2], ids=["shared_positions", "per_row_positions"])
def test_rotary(T, angle_rows):
    n_head, C = 12, 264  # head dim 22: rotary turns pairs of channels
    angles = torch.rand(angle_rows, T, C // n_head // 2) * 6.0
    for inverse in (False, True):
        opcheck(kernels.rotary, (leaf(2, T, 3 * C), angles.cos(), angles.sin(), n_head, inverse))


# ---------------------------------------------------------------------------- a compiled model

def test_compiled_packed_attention_matches_eager():
    """The op table's check of the starts values is data-dependent: compiled, it is left to the kernel,
    and the graph has no break."""
    from mingpt.ops.cpp import OPS
    torch._dynamo.reset()
    qkv, starts = torch.randn(2, 17, 3 * 24), packed_starts(2, 17)
    compiled = torch.compile(OPS["causal_attention"], fullgraph=True)
    torch.testing.assert_close(compiled(qkv, 2, starts), OPS["causal_attention"](qkv, 2, starts), rtol=0, atol=0)


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=37)


def loss_and_grads(model, forward, idx, targets):
    model.zero_grad(set_to_none=True)
    _, loss = forward(idx, targets)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def tiny_model(dropout):
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, dropout=dropout), backend="cpp").train()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(TINY["vocab_size"], (3, 16), generator=g), torch.randint(TINY["vocab_size"], (3, 16), generator=g)


def test_compiled_model_matches_eager_without_dropout():
    """fullgraph: no graph break anywhere in the forward and backward. The compiled graph runs the same
    kernels; only the matmuls and adds around them may fuse or reorder, so loss and gradients agree to
    fp32 rounding (1e-5 relative, 1e-6 absolute on the gradients of ~1e-2)."""
    torch._dynamo.reset()
    model = tiny_model(dropout=0.0)
    idx, targets = batch()
    compiled_loss, compiled_grads = loss_and_grads(model, torch.compile(model, fullgraph=True), idx, targets)
    eager_loss, eager_grads = loss_and_grads(model, model, idx, targets)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_model_with_dropout_runs_forward_and_backward():
    """The dropout seed is a tensor input of the op, drawn inside the graph: no graph break. Compiled
    RNG streams differ from eager's, so only the run itself is checked: a finite loss near eager's
    (random init: ~ln(vocab)), a finite gradient for every parameter, and masks that change per call."""
    torch._dynamo.reset()
    model = tiny_model(dropout=0.2)
    idx, targets = batch()
    compiled = torch.compile(model, fullgraph=True)  # its first call: the op table is resolved already
    loss, grads = loss_and_grads(model, compiled, idx, targets)
    eager_loss, _ = loss_and_grads(model, model, idx, targets)
    assert torch.isfinite(loss) and abs(float(loss) - float(eager_loss)) < 0.5
    assert set(grads) == {name for name, _ in model.named_parameters()}
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    again, _ = loss_and_grads(model, compiled, idx, targets)
    assert not torch.equal(again, loss), "each call should draw a new dropout mask"
