"""The C++ CPU kernels (mingpt.cpp_ops, from mingpt._C) against the reference ops, outputs and every gradient.

The test matrix is the one the Triton kernels face (tests/test_triton_kernels.py), with bfloat16 in
place of float16: bfloat16 is what CPU autocast and `--dtype bfloat16` use, and float16 is not a CPU
training dtype here (the kernels refuse it by name).

How results are compared. The truth is the reference op (mingpt.ops) evaluated in fp64 on the same
inputs; every input and upstream gradient is drawn exactly representable in bf16, so the fp32 and bf16
runs see the very same numbers and the truth carries no rounding of its own. The error of a tensor is
max|actual - truth| / max(max|truth|, 1): relative to the tensor's scale, so a value that cancels to
near zero (a gradient summed over rows) is judged by the precision the sum could have had.

Tolerances, and why:
  fp32  1e-5. fp32's unit roundoff is 6e-8; the kernels sum at most a few thousand terms in fp32 in
        another order than torch, and their exp (and tanh through it) is within ~2 ulp, which
        bounds the error at a few tens of roundoffs (observed <= 8e-7, torch's own fp32 ops the
        same). A wrong mask, a missing rescale or a dropped term shows up at 1e-3 or more.
  bf16  2**-7 (7.8e-3), and no worse than 2x torch's own bf16 op + 2**-8. bf16 keeps 8 significant
        bits, so rounding a value costs up to half an ulp, 2**-8 = 3.9e-3 of it. The kernels compute
        in fp32 and round each output once, so that rounding is all they lose (observed <= 3.9e-3;
        torch's bf16 ops <= 2.7e-2, its layer norm's weight gradient); 2**-7 is two half-ulps. The
        comparison with torch's bf16 op says the kernel loses no more precision than the op it replaces.
  There is no fp64 gradcheck: the kernels compute in fp32 (they take fp32 and bf16 only), so the
  fp64 truth above at fp32's tolerance is the gradient check.

Shapes: widths C = 7, 252 (the seed preset), 1027 and 4108; head dim 21 (the seed preset, not a
multiple of the 8-float vectors) and 32; T = 1, 17, 64, 130 and 256 (the largest block the issue
names); batch 1 and 3.
"""
import importlib
import math
import sys
import types

import pytest
import torch

from mingpt import extension, ops

try:
    from mingpt import cpp_ops
    from mingpt.cpp_ops import OPS
except ImportError as e:
    pytest.skip(f"the C++ kernels are not available: {e}", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7}
HALF_ULP_BF16 = 2.0 ** -8
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]


def rand(*shape, scale=1.0, shift=0.0):
    """Normal values rounded to bf16, held in fp64: exact in every dtype under test."""
    return (torch.randn(tuple(shape), dtype=torch.float64) * scale + shift).bfloat16().double()


def run(fn, inputs, dtype, grad_out):
    """fn(*inputs) with the float inputs cast to dtype as leaves; returns [out, grads...]."""
    leaves = [t.detach().to(dtype).requires_grad_() if torch.is_tensor(t) and t.is_floating_point()
              else t for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out] + [t.grad for t in leaves if torch.is_tensor(t) and t.requires_grad]


def err(actual, truth):
    return ((actual.double() - truth).abs().max() / truth.abs().max().clamp_min(1.0)).item()


def check_op(op, inputs, dtype, names):
    """The kernel's output and gradients against the fp64 reference, at dtype's tolerance."""
    reference = ops.REFERENCE_OPS[op]
    truth_out = reference(*[t.detach() if torch.is_tensor(t) else t for t in inputs])
    grad_out = rand(*truth_out.shape)
    truth = run(reference, inputs, torch.float64, grad_out)
    got = run(OPS[op], inputs, dtype, grad_out)
    assert len(got) == len(truth) == len(names)
    torch_bf16 = run(reference, inputs, dtype, grad_out) if dtype == torch.bfloat16 else None
    for i, name in enumerate(names):
        want = torch.float32 if op == "cross_entropy" and i == 0 else dtype  # the loss is fp32
        assert got[i].dtype == want, f"{op} {name}: dtype {got[i].dtype}, expected {want}"
        assert got[i].shape == truth[i].shape, name
        e = err(got[i], truth[i])
        assert e <= TOL[dtype], f"{op} {name} ({dtype}): error {e:.2e} > {TOL[dtype]:.1e}"
        if torch_bf16 is not None:
            bound = 2 * err(torch_bf16[i], truth[i]) + HALF_ULP_BF16
            assert e <= bound, f"{op} {name} (bf16): error {e:.2e} > 2x torch's bf16 op + half an ulp ({bound:.2e})"


# ---------------------------------------------------------------------------- the op table

def test_cpu_backends_serve_every_op_from_cpp():
    for backend in ("cpp", "fused", "auto"):
        table = ops.get_ops(backend, "cpu")
        assert table.sources == {op: "cpp" for op in ops.OP_NAMES}, backend
        for op in ops.OP_NAMES:
            assert getattr(table, op) is OPS[op]


def test_missing_extension_makes_the_backend_unavailable(monkeypatch):
    """Without mingpt._C, cpp_ops fails to import with the extension's reason; the op table reports
    the backend unavailable with it, and `auto` falls back to the reference."""
    monkeypatch.delitem(sys.modules, "mingpt.cpp_ops")
    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "UNAVAILABLE_REASON", "mingpt._C could not be loaded (gone)")
    with pytest.raises(ops.BackendUnavailable, match=r"could not be loaded \(gone\)"):
        ops.get_ops("cpp", "cpu")
    assert ops.get_ops("auto", "cpu").name == "reference"


def test_stale_extension_says_to_rebuild(monkeypatch):
    """A mingpt._C built before these kernels existed registers none of them."""
    monkeypatch.delitem(sys.modules, "mingpt.cpp_ops")
    monkeypatch.setattr(torch.ops, "mingpt", types.SimpleNamespace())
    with pytest.raises(ImportError, match="out of date.*layer_norm_forward.*rebuild"):
        importlib.import_module("mingpt.cpp_ops")


@pytest.mark.parametrize("op", ["layer_norm", "bias_gelu", "causal_attention"])
def test_expanded_upstream_gradient(op):
    """out.sum().backward() hands the backward kernels a stride-0 (expanded) gradient."""
    C = 42
    inputs = {"layer_norm": (rand(3, 17, C), rand(C), rand(C)), "bias_gelu": (rand(3, 17, C), rand(C)),
              "causal_attention": (rand(3, 17, 3 * C), 2)}[op]

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() if torch.is_tensor(t) else t for t in inputs]
        fn(*leaves).sum().backward()
        return [t.grad for t in leaves if torch.is_tensor(t)]

    for got, truth in zip(grads(OPS[op], torch.float32), grads(ops.REFERENCE_OPS[op], torch.float64)):
        assert err(got, truth) <= TOL[torch.float32]


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

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead", [(1, 1), (3, 17)], ids=["1x1", "3x17"])
@pytest.mark.parametrize("C", [7, 252, 1027])
def test_layer_norm(C, lead, dtype):
    x = rand(*lead, C, scale=2.0, shift=0.5)
    check_op("layer_norm", (x, rand(C, shift=1.0), rand(C)), dtype, ["y", "dx", "dweight", "dbias"])


def test_layer_norm_seed_preset_shape():
    check_op("layer_norm", (rand(2, 64, 252), rand(252, shift=1.0), rand(252)), torch.float32,
             ["y", "dx", "dweight", "dbias"])


@pytest.mark.parametrize("affine", ["none", "weight_only"])
def test_layer_norm_without_affine_params(affine):
    C = 252
    w = rand(C, shift=1.0) if affine == "weight_only" else None
    names = ["y", "dx", "dweight"] if w is not None else ["y", "dx"]
    check_op("layer_norm", (rand(3, 17, C), w, None), torch.float32, names)


def test_layer_norm_strided_input():
    """A last-dim slice (rows not contiguous with each other) and a transposed batch."""
    C = 252
    w, b = rand(C).float(), rand(C).float()
    for x in (rand(3, 17, C + 9).float()[..., :C], rand(17, 3, C).float().transpose(0, 1)):
        assert not x.is_contiguous()
        truth = ops.reference_layer_norm(x.double(), w.double(), b.double())
        assert err(OPS["layer_norm"](x, w, b), truth) <= TOL[torch.float32]


def test_layer_norm_mixed_dtypes_like_reference():
    """bf16 x with fp32 weight and bias: bf16 out, fp32 parameter gradients, as F.layer_norm gives."""
    x, w, b = (t.requires_grad_() for t in (rand(3, 5, 24).bfloat16(), rand(24).float(), rand(24).float()))
    y = OPS["layer_norm"](x, w, b)
    assert y.dtype == ops.reference_layer_norm(x, w, b).dtype == torch.bfloat16
    y.float().sum().backward()
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)


def test_layer_norm_rejects_bad_input():
    x = torch.zeros(2, 3, 8)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        OPS["layer_norm"](x, torch.ones(7), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS["layer_norm"](x.double(), torch.ones(8), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS["layer_norm"](x.half(), torch.ones(8), None)
    with pytest.raises((RuntimeError, NotImplementedError), match="mingpt::layer_norm_forward"):
        OPS["layer_norm"](x.to("meta"), torch.ones(8, device="meta"), None)


# ---------------------------------------------------------------------------- bias + GELU

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead", [(1, 1), (3, 17)], ids=["1x1", "3x17"])
@pytest.mark.parametrize("N", [7, 252, 1027, 4108])
def test_bias_gelu(N, lead, dtype):
    check_op("bias_gelu", (rand(*lead, N, scale=2.0), rand(N)), dtype, ["y", "dx", "dbias"])


def test_bias_gelu_without_bias_and_saturation():
    """No bias; and inputs far in both tails, where tanh saturates to +-1."""
    x = torch.cat([rand(3, 17, 40), torch.linspace(-30, 30, 40, dtype=torch.float64).expand(3, 1, 40)], dim=1)
    check_op("bias_gelu", (x, None), torch.float32, ["y", "dx"])


def test_bias_gelu_mixed_dtypes_promote_like_reference():
    """A bf16 matmul output with an fp32 bias (autocast) gives fp32, as x + bias does, and the
    gradients come back in each input's dtype."""
    x, b = rand(3, 5, 24).bfloat16().requires_grad_(), rand(24).float().requires_grad_()
    y = OPS["bias_gelu"](x, b)
    assert y.dtype == ops.reference_bias_gelu(x, b).dtype == torch.float32
    assert err(y, ops.reference_bias_gelu(x.double(), b.double())) <= TOL[torch.float32]
    y.sum().backward()
    assert (x.grad.dtype, b.grad.dtype) == (torch.bfloat16, torch.float32)


def test_bias_gelu_rejects_bad_input():
    with pytest.raises(RuntimeError, match="bias must have shape"):
        OPS["bias_gelu"](torch.zeros(2, 8), torch.zeros(9))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS["bias_gelu"](torch.zeros(2, 8, dtype=torch.float64), None)


# ---------------------------------------------------------------------------- causal attention

HEADS = [(2, 21), (3, 32)]  # (n_head, head dim): 21 is the seed preset's


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("H,D", HEADS, ids=[f"H{h}-D{d}" for h, d in HEADS])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 17, 64])
def test_causal_attention(T, B, H, D, dtype):
    check_op("causal_attention", (rand(B, T, 3 * H * D), H), dtype, ["y", "dqkv"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_causal_attention_seed_preset_shape(dtype):
    """12 heads of 21 (n_embd 252), the whole block of 64."""
    check_op("causal_attention", (rand(2, 64, 3 * 252), 12), dtype, ["y", "dqkv"])


@pytest.mark.parametrize("T,H,D", [(130, 2, 21), (256, 1, 7)])
def test_causal_attention_long_blocks(T, H, D):
    """T not a multiple of the 4-row blocks or the 8-float vectors, and the longest block named (256)."""
    check_op("causal_attention", (rand(2, T, 3 * H * D), H), torch.float32, ["y", "dqkv"])


@pytest.mark.parametrize("layout", ["sliced_columns", "transposed_batch"])
def test_causal_attention_reads_strided_qkv(layout):
    B, T, H, D = 2, 17, 2, 21
    C = H * D
    if layout == "sliced_columns":
        qkv = rand(B, T, 3 * C + 11)[..., :3 * C]
    else:
        qkv = rand(T, B, 3 * C).transpose(0, 1)
    assert not qkv.is_contiguous()
    check_op("causal_attention", (qkv, H), torch.float32, ["y", "dqkv"])


@pytest.mark.parametrize("shape", [(0, 5, 12), (2, 0, 12)], ids=["B0", "T0"])
def test_causal_attention_empty_input(shape):
    qkv = torch.zeros(shape, requires_grad=True)
    out = OPS["causal_attention"](qkv, 2)
    assert out.shape == ops.reference_causal_attention(qkv, 2).shape
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


def test_causal_attention_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        OPS["causal_attention"](torch.zeros(1, 4, 3 * 10), 3)
    with pytest.raises(ValueError, match=r"\(B, T, 3\*C\)"):
        OPS["causal_attention"](torch.zeros(1, 4, 10), 1)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        OPS["causal_attention"](torch.zeros(1, 4, 12, dtype=torch.float16), 2)


# ---------------------------------------------------------------------------- cross entropy

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead", [(1, 1), (3, 17)], ids=["1x1", "3x17"])
@pytest.mark.parametrize("V", [7, 50, 2053])
def test_cross_entropy(V, lead, dtype):
    logits = rand(*lead, V, scale=3.0)
    targets = torch.randint(0, V, lead)
    if targets.numel() > 1:
        targets.view(-1)[::5] = -1  # ignore_index, as the reference
    check_op("cross_entropy", (logits, targets), dtype, ["loss", "dlogits"])


def test_cross_entropy_seed_preset_shape():
    """Batch 2 x 64 over a vocabulary of 2,212 (the 5k movie reviews' characters)."""
    check_op("cross_entropy", (rand(2, 64, 2212, scale=3.0), torch.randint(0, 2212, (2, 64))), torch.float32,
             ["loss", "dlogits"])


def test_cross_entropy_all_ignored_and_bad_targets():
    logits = rand(2, 3, 7).float().requires_grad_()
    ignored = torch.full((2, 3), -1)
    loss = OPS["cross_entropy"](logits, ignored)
    assert torch.isnan(loss) and torch.isnan(ops.reference_cross_entropy(logits, ignored))
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(IndexError, match="target 7 at row 0"):
        OPS["cross_entropy"](logits, torch.full((2, 3), 7))
    with pytest.raises(IndexError, match="target -2"):
        OPS["cross_entropy"](logits, torch.full((2, 3), -2))
    with pytest.raises(RuntimeError, match="int64"):
        OPS["cross_entropy"](logits, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="targets must have shape"):
        OPS["cross_entropy"](logits, torch.zeros(2, 4, dtype=torch.long))


def test_cross_entropy_dtype():
    """fp32 loss for fp32 and bf16 logits (the reference upcasts with .float())."""
    for dtype in DTYPES:
        loss = OPS["cross_entropy"](rand(2, 3, 7).to(dtype), torch.zeros(2, 3, dtype=torch.long))
        assert loss.dtype == torch.float32 and loss.dim() == 0 and math.isfinite(loss.item())
