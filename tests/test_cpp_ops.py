"""The C++ CPU kernels (mingpt.ops.cpp, from mingpt._C): the checks only they face.

The checks every fused backend faces, in fp32 and bf16, are in tests/test_fused_ops.py;
tests/op_check.py says how results are compared and why the tolerances are what they are. Here: the
extension missing or stale, the dtypes under CPU autocast, the errors of the kernels' own input
checks, empty inputs, longer blocks, attention over packed rows (starts), the seed preset's
cross-entropy shape and bad targets.

There is no fp64 gradcheck: the kernels compute in fp32 (they take fp32 and bf16 only), so the fp64
truth of op_check at fp32's tolerance (1e-5) is the gradient check.

Shapes beyond the shared grid: T = 130 (not a multiple of the 4-row blocks or the 8-float vectors)
and 256 (the largest block the issue names); a vocabulary of 2,212.
"""
import importlib
import sys
import types

import pytest
import torch

from mingpt import ops
from mingpt.ops import extension, reference
from op_check import BACKENDS

CPP = BACKENDS["cpp"].load()
OPS = CPP.ops
rand = CPP.rand


# ---------------------------------------------------------------------------- the op table

def test_fused_and_auto_on_cpu_serve_every_op_from_cpp():
    for backend in ("fused", "auto"):
        table = ops.get_ops(backend, "cpu")
        # the decode op has no CPU kernel of its own (the compiled sampler decodes on the CPU), nor the ops of
        # the architecture options outside OP_NAMES
        assert table.sources == {op: "cpp" if op in ops.OP_NAMES else "reference" for op in ops.REFERENCE_OPS}, backend
        for op in ops.OP_NAMES:
            assert getattr(table, op) is OPS[op]


def test_missing_extension_makes_the_backend_unavailable(monkeypatch):
    """Without mingpt._C, mingpt.ops.cpp fails to import with the extension's reason; the op table reports
    the backend unavailable with it, and `auto` falls back to the reference."""
    monkeypatch.delitem(sys.modules, "mingpt.ops.cpp")
    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "UNAVAILABLE_REASON", "mingpt._C could not be loaded (gone)")
    with pytest.raises(ops.BackendUnavailable, match=r"could not be loaded \(gone\)"):
        ops.get_ops("cpp", "cpu")
    assert ops.get_ops("auto", "cpu").name == "reference"


def test_stale_extension_says_to_rebuild(monkeypatch):
    """A mingpt._C built before these kernels existed registers none of them."""
    monkeypatch.delitem(sys.modules, "mingpt.ops.cpp")
    monkeypatch.setattr(torch.ops, "mingpt", types.SimpleNamespace())
    with pytest.raises(ImportError, match="out of date.*layer_norm_forward.*rebuild"):
        importlib.import_module("mingpt.ops.cpp")


def test_autocast_dtypes_match_reference():
    """Under bf16 autocast, as the model calls them, every op returns the reference's dtype and hands
    each input its gradient in that input's dtype: fp32 residual stream into layer norm, a bf16 matmul
    output with an fp32 bias into GELU (fp32 out), bf16 or fp32 qkv into attention (bf16 out either
    way), bf16 logits into the loss (fp32)."""
    C, V = 24, 11
    cases = {
        "layer_norm": (rand(2, 5, C).float(), rand(C).float(), rand(C).float()),
        "bias_gelu": (rand(2, 5, C).bfloat16(), rand(C).float()),
        "causal_attention": (rand(2, 5, 3 * C).bfloat16(), 2),
        "cross_entropy": (rand(2, 5, V).bfloat16(), torch.randint(0, V, (2, 5))),
    }
    cases["causal_attention_fp32"] = (rand(2, 5, 3 * C).float(), 2)
    for name, inputs in cases.items():
        op = name.replace("_fp32", "")
        results = []
        for fn in (OPS[op], ops.REFERENCE_OPS[op]):
            leaves = [t.detach().clone().requires_grad_() if torch.is_tensor(t) and t.is_floating_point()
                      else t for t in inputs]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fn(*leaves)
            out.float().sum().backward()
            results.append([out.dtype] + [t.grad.dtype for t in leaves if torch.is_tensor(t) and t.requires_grad])
        assert results[0] == results[1], f"{name}: cpp dtypes {results[0]}, reference {results[1]}"


# ---------------------------------------------------------------------------- layer norm

def test_layer_norm_rejects_bad_input():
    x = torch.zeros(2, 3, 8)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        OPS["layer_norm"](x, torch.ones(7), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS["layer_norm"](x.double(), torch.ones(8), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS["layer_norm"](x.half(), torch.ones(8), None)
    # Meta tensors run the fake kernel (what torch.compile traces with): shapes and dtypes, no data.
    y = OPS["layer_norm"](x.to("meta"), torch.ones(8, device="meta"), None)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype


# ---------------------------------------------------------------------------- bias + GELU

def test_bias_gelu_rejects_bad_input():
    with pytest.raises(RuntimeError, match="bias must have shape"):
        OPS["bias_gelu"](torch.zeros(2, 8), torch.zeros(9))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS["bias_gelu"](torch.zeros(2, 8, dtype=torch.float64), None)


# ---------------------------------------------------------------------------- rotary positions

def test_rotary_kernel_rejects_bad_input():
    """The kernel's own checks (under the op table's), for callers of torch.ops.mingpt.rotary."""
    qkv, angles = torch.zeros(2, 4, 3 * 28), torch.zeros(1, 4, 7)
    with pytest.raises(RuntimeError, match="heads of an even size"):
        torch.ops.mingpt.rotary(torch.zeros(2, 4, 3 * 21), angles, angles, 3, False)
    with pytest.raises(RuntimeError, match=r"sin must have shape \(1 or 2, 4, 7\), got \[3, 4, 7\]"):
        torch.ops.mingpt.rotary(qkv, angles, torch.zeros(3, 4, 7), 2, False)
    with pytest.raises(RuntimeError, match="cos must be a float32 CPU tensor"):
        torch.ops.mingpt.rotary(qkv, angles.double(), angles, 2, False)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.mingpt.rotary(qkv.half(), angles, angles, 2, False)


def test_rotary_is_its_own_inverse_turned_back():
    """Turning by an angle and back gives the input (the backward's identity), the values untouched."""
    qkv, angles = rand(3, 17, 3 * 2 * 14).float(), torch.rand(3, 17, 7) * 6.0
    turned = torch.ops.mingpt.rotary(qkv, angles.cos(), angles.sin(), 2, False)
    torch.testing.assert_close(torch.ops.mingpt.rotary(turned, angles.cos(), angles.sin(), 2, True), qkv)
    assert torch.equal(turned[..., 56:], qkv[..., 56:]) and not torch.allclose(turned[..., :56], qkv[..., :56])


# ---------------------------------------------------------------------------- causal attention

@pytest.mark.parametrize("T,H,D", [(130, 2, 21), (256, 1, 7)])
def test_causal_attention_long_blocks(T, H, D):
    """T not a multiple of the 4-row blocks or the 8-float vectors, and the longest block named (256)."""
    CPP.check_op("causal_attention", (rand(2, T, 3 * H * D), H), torch.float32, ["y", "dqkv"])


@pytest.mark.parametrize("shape", [(0, 5, 12), (2, 0, 12)], ids=["B0", "T0"])
def test_causal_attention_empty_input(shape):
    qkv = torch.zeros(shape, requires_grad=True)
    out = OPS["causal_attention"](qkv, 2)
    assert out.shape == reference.reference_causal_attention(qkv, 2).shape
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


def test_causal_attention_rejects_fp16():
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS["causal_attention"](torch.zeros(1, 4, 12, dtype=torch.float16), 2)


# ---------------------------------------------------------------------------- packed rows (starts)

def starts_from_lengths(rows):
    """starts (len(rows), T) from the lengths of each row's reviews, in order: every position of a
    review holds that review's first position. A row's trailing padding is given as one more length."""
    starts = []
    for lengths in rows:
        row = []
        for length in lengths:
            row += [len(row)] * length
        starts.append(row)
    assert len({len(row) for row in starts}) == 1, "every row must fill the same T"
    return torch.tensor(starts, dtype=torch.long)


def review_lengths(total, generator, mean=16):
    """Random review lengths (1..2*mean) filling `total` positions; the last is cut to fit."""
    lengths = []
    while total > 0:
        length = min(total, int(torch.randint(1, 2 * mean + 1, (), generator=generator)))
        lengths.append(length)
        total -= length
    return lengths


def packed_rows(B, T, seed=0):
    """B rows of T: one review filling the row; a 1-token review at each end of random ones; random
    reviews then trailing padding (its own segment, a quarter of the row)."""
    g = torch.Generator().manual_seed(seed)
    padding = T // 4
    rows = [[T],
            [1] + review_lengths(T - 2, g) + [1] if T >= 2 else [T],
            review_lengths(T - padding, g) + ([padding] if padding else [])]
    return starts_from_lengths(rows[:B])


SEED_PRESET = dict(n_head=12, C=252)  # head dim 21: not a multiple of the 8-float vectors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B", [2, 3])
@pytest.mark.parametrize("T", [1, 17, 64])
def test_causal_attention_packed_rows(T, B, dtype):
    """Output and qkv gradient against the reference with the same starts, at op_check's tolerances
    (fp32 1e-5; bf16 2**-7 and no worse than torch's own bf16 attention)."""
    starts = packed_rows(B, T, seed=T)
    qkv = rand(B, T, 3 * SEED_PRESET["C"])
    CPP.check_op("causal_attention", (qkv, SEED_PRESET["n_head"], starts), dtype, ["y", "dqkv"])


def test_causal_attention_packed_long_rows():
    """T = 130 (ragged blocks and vectors), reviews of 1..64 tokens: key blocks whose first query
    starts a vector or more after the block's keys."""
    g = torch.Generator().manual_seed(3)
    starts = starts_from_lengths([review_lengths(130, g, mean=32) for _ in range(2)])
    CPP.check_op("causal_attention", (rand(2, 130, 3 * 2 * 21), 2, starts), torch.float32, ["y", "dqkv"])


def test_causal_attention_packed_row_is_its_reviews_alone():
    """A packed row gives each review what attention over that review alone gives it, and the same
    gradients, to fp32 rounding (a few ulps, 1e-6 relative): the kernel sums the same terms, some in
    other vector lanes."""
    T, C, H = 40, 48, 4
    lengths = [9, 1, 17, 13]
    qkv = torch.randn(1, T, 3 * C, requires_grad=True)
    packed = OPS["causal_attention"](qkv, H, starts_from_lengths([lengths]))
    packed.square().sum().backward()
    at = 0
    for length in lengths:
        part = qkv.detach()[:, at:at + length].clone().requires_grad_()
        alone = OPS["causal_attention"](part, H)
        alone.square().sum().backward()
        torch.testing.assert_close(packed[:, at:at + length], alone, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(qkv.grad[:, at:at + length], part.grad, rtol=1e-6, atol=1e-6)
        at += length


def test_causal_attention_starts_at_zero_is_plain_causal():
    """starts of zeros is causal attention, bit for bit; int32 starts give int64's result."""
    qkv = rand(2, 17, 3 * 24).float()
    plain = OPS["causal_attention"](qkv, 2)
    zeros = torch.zeros(2, 17, dtype=torch.long)
    assert torch.equal(OPS["causal_attention"](qkv, 2, zeros), plain)
    assert torch.equal(OPS["causal_attention"](qkv, 2, zeros.int()), plain)


def test_causal_attention_one_token_reviews_see_themselves():
    """Every position its own review (starts[b, i] = i): the output is the value at the position."""
    B, T, C = 2, 17, 24
    qkv = rand(B, T, 3 * C).float()
    starts = torch.arange(T).expand(B, T)
    torch.testing.assert_close(OPS["causal_attention"](qkv, 2, starts), qkv[..., 2 * C:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 5, 12), (2, 0, 12)], ids=["B0", "T0"])
def test_causal_attention_packed_empty_input(shape):
    qkv = torch.zeros(shape, requires_grad=True)
    out = OPS["causal_attention"](qkv, 2, torch.zeros(shape[:2], dtype=torch.long))
    out.sum().backward()
    assert out.shape == (*shape[:2], 4) and qkv.grad.shape == qkv.shape


def test_causal_attention_rejects_bad_starts():
    """The op table's checks: ValueError naming the problem."""
    attention, qkv = OPS["causal_attention"], torch.zeros(2, 5, 12)
    good = starts_from_lengths([[2, 3], [5]])
    with pytest.raises(ValueError, match=r"starts must be integers of shape \(2, 5\)"):
        attention(qkv, 2, good[:, :4])
    with pytest.raises(ValueError, match="starts must be integers"):
        attention(qkv, 2, good.float())
    with pytest.raises(ValueError, match="starts must be integers"):
        attention(qkv, 2, good.bool())
    late = good.clone()
    late[1, 2] = 3
    with pytest.raises(ValueError, match=r"starts\[1, 2\] = 3 is outside 0..2"):
        attention(qkv, 2, late)
    negative = good.clone()
    negative[0, 0] = -1
    with pytest.raises(ValueError, match=r"starts\[0, 0\] = -1 is outside"):
        attention(qkv, 2, negative)
    falling = good.clone()
    falling[0, 4] = 1
    with pytest.raises(ValueError, match=r"starts decreases along T at \[0, 4\] \(2 then 1\)"):
        attention(qkv, 2, falling)


def test_causal_attention_kernels_reject_bad_starts():
    """The kernels' own checks (torch.ops.mingpt, without the op table): RuntimeError naming the op."""
    kernels = torch.ops.mingpt
    qkv, good = torch.zeros(2, 5, 12), starts_from_lengths([[2, 3], [5]])
    out, lse = kernels.causal_attention_forward(qkv, 2, good)
    late, falling = good.clone(), good.clone()
    late[1, 2], falling[0, 4] = 3, 1
    bad = {"must be int64": good.int(), r"must have shape \(2, 5\)": good[:1],
           r"starts\[1, 2\] = 3 is outside 0..2": late, r"decreases along T at \[0, 4\] \(2 then 1\)": falling}
    for message, starts in bad.items():
        with pytest.raises(RuntimeError, match="causal_attention_forward: .*" + message):
            kernels.causal_attention_forward(qkv, 2, starts)
        with pytest.raises(RuntimeError, match="causal_attention_backward: .*" + message):
            kernels.causal_attention_backward(out, qkv, lse, 2, starts)


def test_stale_extension_without_starts_says_to_rebuild(monkeypatch):
    """A mingpt._C built before packed rows registers the attention kernels without `starts`."""
    def kernel(schema):
        return types.SimpleNamespace(default=types.SimpleNamespace(_schema=schema))

    old = {name: kernel(f"mingpt::{name}(Tensor x) -> Tensor") for name in sys.modules["mingpt.ops.cpp"].KERNELS}
    old["dropout"] = kernel("mingpt::dropout(Tensor x, float p, Tensor seed) -> Tensor")
    old["causal_attention_forward"] = kernel("mingpt::causal_attention_forward(Tensor qkv, int n_head) -> (Tensor, Tensor)")
    monkeypatch.delitem(sys.modules, "mingpt.ops.cpp")
    monkeypatch.setattr(torch.ops, "mingpt", types.SimpleNamespace(**old))
    with pytest.raises(ImportError, match=r"out of date.*causal_attention_forward\(Tensor qkv, int n_head, "
                                          r"Tensor\? starts\).*rebuild"):
        importlib.import_module("mingpt.ops.cpp")


# ---------------------------------------------------------------------------- cross entropy

def test_cross_entropy_seed_preset_shape():
    """Batch 2 x 64 over a vocabulary of 2,212 (the 5k movie reviews' characters)."""
    CPP.check_op("cross_entropy", (rand(2, 64, 2212, scale=3.0), torch.randint(0, 2212, (2, 64))), torch.float32,
                 ["loss", "dlogits"])


def test_cross_entropy_rejects_bad_targets():
    logits = rand(2, 3, 7).float()
    with pytest.raises(IndexError, match="target 7 at row 0"):
        OPS["cross_entropy"](logits, torch.full((2, 3), 7))
    with pytest.raises(IndexError, match="target -2"):
        OPS["cross_entropy"](logits, torch.full((2, 3), -2))
    with pytest.raises(RuntimeError, match="int64"):
        OPS["cross_entropy"](logits, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="targets must have shape"):
        OPS["cross_entropy"](logits, torch.zeros(2, 4, dtype=torch.long))

