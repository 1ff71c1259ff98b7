"""The Triton kernels (mingpt.kernels): the checks only they face.

The checks every fused backend faces, in fp32 and fp16, are in tests/test_fused_ops.py;
tests/op_check.py says how results are compared and why the tolerances are what they are. Here: the
fused residual add (add_layer_norm), attention over many query and key blocks, an out-of-range
target, and fp64 gradchecks.

  fp64  torch.autograd.gradcheck (finite differences, eps 1e-6, atol 1e-5 / rtol 1e-3 defaults) of
        every Function: the interpreter runs fp64 throughout, tl.dot included, so every kernel is
        gradchecked; accumulators follow the input to fp64 for this.

Shapes beyond the shared grid: attention in forced 16-row blocks (T = 17, 64), and T = 130 in the
default blocks of 64 (three blocks with a ragged last one).

Packed rows (attention with `starts`): against mingpt.ops.reference.reference_causal_attention(qkv, n_head,
starts) in fp32 and fp16 at op_check's tolerances (fp32 1e-5; fp16 4e-3 and no worse than 2x torch's
own fp16 op + half an ulp), outputs and the qkv gradient, at the seed preset's odd head dim (n_embd 252,
12 heads of 21), T = 1, 17 and 64, in forced 16-row blocks and the default ones. The rows hold one
review, 1-token reviews, reviews that straddle block boundaries or begin on one, and trailing padding as
a segment of its own, besides reviews of random lengths. bf16 is not checked here: the interpreter's
bf16 tl.dot is wrong.
"""
import itertools
import random

import pytest
import torch

from mingpt.ops import reference
from op_check import BACKENDS, DTYPE_IDS, err

pytestmark = pytest.mark.triton

TRITON = BACKENDS["triton"].load()
OPS = TRITON.ops
DEVICE = TRITON.device
rand = TRITON.rand

from mingpt.kernels.attention import CausalAttentionFn  # noqa: E402
from mingpt.kernels.op_table import add_layer_norm  # noqa: E402


def gradcheck(fn, *inputs, **kw):
    args = [t.to(DEVICE, torch.float64).requires_grad_() if torch.is_tensor(t) and t.is_floating_point()
            else t for t in inputs]
    assert torch.autograd.gradcheck(fn, args, **kw)


# ---------------------------------------------------------------------------- layer norm

def _add_layer_norm_reference(x, r, w, b):
    s = x + r
    return s, reference.reference_layer_norm(s, w, b)


@pytest.mark.parametrize("use_sum", [True, False], ids=["sum_and_norm_used", "norm_only"])
@pytest.mark.parametrize("dtype,C", [(torch.float32, 7), (torch.float32, 252), (torch.float32, 1027),
                                     (torch.float16, 252)], ids=["fp32-7", "fp32-252", "fp32-1027", "fp16-252"])
def test_add_layer_norm(C, dtype, use_sum):
    """The fused residual add: (x + r, LN(x + r)), gradients to x, r, weight and bias."""
    inputs = (rand(3, 17, C), rand(3, 17, C), rand(C, shift=1.0), rand(C))
    g_s, g_y = rand(3, 17, C), rand(3, 17, C)

    def grads(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in inputs]
        s, y = fn(*leaves)
        loss = (y.double() * g_y).sum() + ((s.double() * g_s).sum() if use_sum else 0)
        loss.backward()
        return [s, y] + [t.grad for t in leaves]

    truth = grads(_add_layer_norm_reference, torch.float64)
    got = grads(add_layer_norm, dtype)
    for name, a, t in zip(["sum", "y", "dx", "dresidual", "dweight", "dbias"], got, truth):
        assert a.dtype == dtype
        e = err(a, t)
        assert e <= TRITON.tol[dtype], f"add_layer_norm {name} ({dtype}): error {e:.2e}"


def test_add_layer_norm_sum_only_gradient():
    x, r, w, b = (rand(2, 5, 7).float().requires_grad_(), rand(2, 5, 7).float().requires_grad_(),
                  rand(7).float(), rand(7).float())
    s, _ = add_layer_norm(x, r, w, b)
    s.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(r.grad, torch.ones_like(r))


def test_layer_norm_gradcheck_fp64():
    gradcheck(lambda x, w, b: OPS["layer_norm"](x, w, b), rand(2, 3, 7), rand(7, shift=1.0), rand(7))
    gradcheck(lambda x: OPS["layer_norm"](x, None, None), rand(2, 3, 7))
    gradcheck(lambda x, r, w, b: add_layer_norm(x, r, w, b),
              rand(2, 3, 7), rand(2, 3, 7), rand(7, shift=1.0), rand(7))


# ---------------------------------------------------------------------------- bias + GELU

def test_bias_gelu_gradcheck_fp64():
    gradcheck(OPS["bias_gelu"], rand(2, 3, 9, scale=2.0), rand(9))
    gradcheck(lambda x: OPS["bias_gelu"](x, None), rand(2, 3, 9, scale=2.0))


# ---------------------------------------------------------------------------- causal attention

@pytest.mark.parametrize("dtype", TRITON.dtypes, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("T,block", [(17, 16), (64, 16), (130, None)], ids=["T17-b16", "T64-b16", "T130-b64"])
def test_causal_attention_many_blocks(T, block, dtype):
    """Several query and key blocks (online-softmax rescaling across blocks, the diagonal block,
    a ragged last block): forced 16-row blocks, or T = 130 in the default blocks of 64."""
    kernel = lambda qkv, h: CausalAttentionFn.apply(qkv, h, None, block)  # noqa: E731
    TRITON.check_op("causal_attention", (rand(2, T, 3 * 2 * 21), 2), dtype, ["y", "dqkv"], kernel=kernel)


def test_causal_attention_gradcheck_fp64():
    gradcheck(lambda qkv: OPS["causal_attention"](qkv, 2), rand(1, 5, 3 * 2 * 3))
    # Three 16-row blocks, ragged last one: fast mode (a random projection of the Jacobian)
    # keeps the interpreter's cost to a few evaluations.
    gradcheck(lambda qkv: CausalAttentionFn.apply(qkv, 1, None, 16), rand(2, 35, 3 * 1 * 5), fast_mode=True)


def packed_starts(rows) -> torch.Tensor:
    """(B, T) starts from each row's review lengths (the last may be the row's padding, a segment too)."""
    starts = []
    for lengths in rows:
        begins = itertools.accumulate([0] + lengths[:-1])
        starts.append([begin for begin, n in zip(begins, lengths) for _ in range(n)])
    assert len({len(row) for row in starts}) == 1, "every row must hold T positions"
    return torch.tensor(starts, device=DEVICE)


def random_lengths(T: int, seed: int, longest: int = 24) -> list:
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < T:
        lengths.append(min(rng.randint(1, longest), T - sum(lengths)))
    return lengths


PACKED_ROWS = {
    1: [[1], [1]],
    # one review; a 1-token review then a review across the block boundary at 16 and 3 of padding; random
    17: [[17], [1, 2, 11, 3], random_lengths(17, 1, 8)],
    # reviews across the boundaries at 16, 32 and 48 with 1-token ones, ending in 9 of padding; reviews
    # that begin on block boundaries, the last spanning two blocks; random
    64: [[3, 1, 20, 1, 1, 18, 11, 9], [16, 16, 32], random_lengths(64, 2)],
}


@pytest.mark.parametrize("dtype", TRITON.dtypes, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("T,block", [(1, None), (17, 16), (64, 16), (64, None)],
                         ids=["T1", "T17-b16", "T64-b16", "T64-default"])
def test_causal_attention_packed_rows(T, block, dtype):
    """Each query attends only within its own review: output and qkv gradient against the reference."""
    starts = packed_starts(PACKED_ROWS[T])
    kernel = lambda qkv, h, s: CausalAttentionFn.apply(qkv, h, s, block)  # noqa: E731
    TRITON.check_op("causal_attention", (rand(len(starts), T, 3 * 252), 12, starts), dtype, ["y", "dqkv"],
                    kernel=kernel)


def test_causal_attention_packed_edge_rows():
    """starts all 0 is plain causal attention, bit for bit; every token its own review gives out = v."""
    qkv = rand(2, 35, 3 * 2 * 5).float()
    plain = CausalAttentionFn.apply(qkv, 2, None, 16)
    assert torch.equal(CausalAttentionFn.apply(qkv, 2, torch.zeros(2, 35, dtype=torch.long, device=DEVICE), 16),
                       plain)
    alone = torch.arange(35, device=DEVICE).expand(2, 35)
    assert torch.allclose(CausalAttentionFn.apply(qkv, 2, alone, 16), qkv[..., 2 * 10:], atol=1e-6)


def test_causal_attention_packed_gradcheck_fp64():
    starts = packed_starts([[2, 1, 17, 15], [35]])
    gradcheck(lambda qkv: CausalAttentionFn.apply(qkv, 1, starts, 16), rand(2, 35, 3 * 1 * 5), fast_mode=True)


@pytest.mark.parametrize("starts,problem", [
    (torch.zeros(2, 5, dtype=torch.long), "shape"),
    (torch.zeros(1, 4), "integers"),
    (torch.tensor([[0, 0, -1, 0]]), r"starts\[0, 2\] = -1 is outside 0..2"),
    (torch.tensor([[0, 0, 3, 3]]), r"starts\[0, 2\] = 3 is outside 0..2"),
    (torch.tensor([[0, 1, 2, 1]]), "decreases"),
], ids=["shape", "float", "negative", "after-position", "decreasing"])
def test_causal_attention_rejects_bad_starts(starts, problem):
    with pytest.raises(ValueError, match=problem):
        OPS["causal_attention"](rand(1, 4, 3 * 2 * 3).float(), 2, starts.to(DEVICE))


# ---------------------------------------------------------------------------- cross entropy

@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the check is an asynchronous device assert")
def test_cross_entropy_rejects_out_of_range_target():
    with pytest.raises(IndexError, match="targets"):
        OPS["cross_entropy"](rand(2, 3, 7).float(), torch.full((2, 3), 7))


def test_cross_entropy_gradcheck_fp64():
    targets = torch.tensor([[3, -1, 0], [10, 5, 5]], device=DEVICE)
    gradcheck(lambda x: OPS["cross_entropy"](x, targets), rand(2, 3, 11, scale=2.0))
