"""The Triton kernels (mingpt.kernels) against the reference ops, outputs and every gradient.

On a machine without CUDA these run in Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton. On a CUDA machine the same tests run the
compiled kernels on the GPU.

How results are compared. The truth is the reference op (mingpt.ops) evaluated in fp64 on the
same inputs; every input and upstream gradient is drawn exactly representable in fp16, so the
fp32 and fp16 runs see the very same numbers and the truth carries no rounding of its own. The
error of a tensor is max|actual - truth| / max(max|truth|, 1): relative to the tensor's scale,
so a value that cancels to near zero (a gradient summed over rows) is judged by the precision
the sum could have had, not by its own tiny magnitude.

Tolerances, and why:
  fp32  1e-5. fp32's unit roundoff is 6e-8; the kernels reduce over at most ~1k terms in fp32
        in another order than torch, which bounds the error at a few tens of roundoffs
        (observed <= 8e-7 here, torch's own fp32 op <= 6e-7). 1e-5 leaves >10x headroom for a
        GPU's different reduction order and still catches any real mistake (a wrong mask, a
        missing rescale or a dropped block shows up at 1e-2 or more).
  fp16  4e-3, and no worse than 2x torch's own fp16 op + 2**-11. The output's final rounding
        to fp16 alone costs up to half an ulp, 2**-11 = 4.9e-4 of the scale; attention also
        rounds P and dS to fp16 before its matmuls, as FlashAttention does (observed <= 6.2e-4,
        torch's fp16 ops <= 1.4e-3). 4e-3 is 8 half-ulps; the comparison with torch's own
        fp16 op says the kernel loses no more precision than the op it replaces.
  fp64  torch.autograd.gradcheck (finite differences, eps 1e-6, atol 1e-5 / rtol 1e-3
        defaults) of every Function: the interpreter runs fp64 throughout, tl.dot included, so
        every kernel is gradchecked; accumulators follow the input to fp64 for this.

Shapes: widths C = 7, 252 (the seed preset), 1027 (1024 + 3: a ragged power-of-two block) and
4108 (more than one column block); head dim 21 (the seed preset, padded to 32) and 32;
T = 1, 17, 64 (and 130, three blocks with a ragged last one); batch 1 and 3. The grids are kept
small so the interpreter finishes in CI on 2 cores.
"""
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the kernels cannot run here",
                allow_module_level=True)

from mingpt import ops  # noqa: E402
from mingpt.kernels.op_table import OPS, add_layer_norm  # noqa: E402
from mingpt.kernels.attention import CausalAttentionFn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 4e-3}
HALF_ULP16 = 2.0 ** -11
DTYPES = [torch.float32, torch.float16]


def rand(*shape, scale=1.0, shift=0.0):
    """Normal values rounded to fp16, held in fp64: exact in every dtype under test."""
    return (torch.randn(tuple(shape), dtype=torch.float64) * scale + shift).half().double().to(DEVICE)


def run(fn, inputs, dtype, grad_out):
    """fn(*inputs) with the float inputs cast to dtype as leaves; returns [out, grads...]."""
    leaves = [t.detach().to(dtype).requires_grad_() if torch.is_tensor(t) and t.is_floating_point()
              else t for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out] + [t.grad for t in leaves if torch.is_tensor(t) and t.requires_grad]


def err(actual, truth):
    return ((actual.double() - truth).abs().max() / truth.abs().max().clamp_min(1.0)).item()


def check_op(op, inputs, dtype, names, kernel=None):
    """The kernel's output and gradients against the fp64 reference, at dtype's tolerance."""
    reference = ops.REFERENCE_OPS[op]
    kernel = kernel or OPS[op]
    truth_out = reference(*[t.detach() if torch.is_tensor(t) else t for t in inputs])
    grad_out = rand(*truth_out.shape)
    truth = run(reference, inputs, torch.float64, grad_out)
    got = run(kernel, inputs, dtype, grad_out)
    assert len(got) == len(truth) == len(names)
    torch_half = run(reference, inputs, dtype, grad_out) if dtype == torch.float16 else None
    for i, name in enumerate(names):
        want = torch.float32 if op == "cross_entropy" and i == 0 else dtype  # the loss is fp32
        assert got[i].dtype == want, f"{op} {name}: dtype {got[i].dtype}, expected {want}"
        assert got[i].shape == truth[i].shape, name
        e = err(got[i], truth[i])
        assert e <= TOL[dtype], f"{op} {name} ({dtype}): error {e:.2e} > {TOL[dtype]:.0e}"
        if torch_half is not None:
            bound = 2 * err(torch_half[i], truth[i]) + HALF_ULP16
            assert e <= bound, f"{op} {name} (fp16): error {e:.2e} > 2x torch's fp16 op ({bound:.2e})"


def gradcheck(fn, *inputs, **kw):
    args = [t.to(DEVICE, torch.float64).requires_grad_() if torch.is_tensor(t) and t.is_floating_point()
            else t for t in inputs]
    assert torch.autograd.gradcheck(fn, args, **kw)


# ---------------------------------------------------------------------------- the op table

def test_op_table_serves_every_op_from_triton():
    table = ops.get_ops("triton", DEVICE)
    assert set(OPS) == set(ops.OP_NAMES)
    assert table.sources == {op: "triton" for op in ops.OP_NAMES}
    for op in ops.OP_NAMES:
        assert getattr(table, op) is OPS[op]


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


# ---------------------------------------------------------------------------- layer norm

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead", [(1, 1), (3, 17)], ids=["1x1", "3x17"])
@pytest.mark.parametrize("C", [7, 252, 1027])
def test_layer_norm(C, lead, dtype):
    x = rand(*lead, C, scale=2.0, shift=0.5)
    check_op("layer_norm", (x, rand(C, shift=1.0), rand(C)), dtype, ["y", "dx", "dweight", "dbias"])


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


def _add_layer_norm_reference(x, r, w, b):
    s = x + r
    return s, ops.reference_layer_norm(s, w, b)


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
        assert e <= TOL[dtype], f"add_layer_norm {name} ({dtype}): error {e:.2e}"


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

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead", [(1, 1), (3, 17)], ids=["1x1", "3x17"])
@pytest.mark.parametrize("N", [7, 252, 1027, 4108])
def test_bias_gelu(N, lead, dtype):
    check_op("bias_gelu", (rand(*lead, N, scale=2.0), rand(N)), dtype, ["y", "dx", "dbias"])


def test_bias_gelu_without_bias_and_saturation():
    """No bias; and inputs far in both tails, where tanh saturates to +-1."""
    x = torch.cat([rand(3, 17, 40), torch.linspace(-30, 30, 40, dtype=torch.float64, device=DEVICE)
                   .expand(3, 1, 40)], dim=1)
    check_op("bias_gelu", (x, None), torch.float32, ["y", "dx"])


def test_bias_gelu_mixed_dtypes_promote_like_reference():
    """An fp16 matmul output with an fp32 bias (autocast) gives fp32, as x + bias does."""
    x, b = rand(3, 5, 24).half(), rand(24).float()
    y = OPS["bias_gelu"](x, b)
    assert y.dtype == ops.reference_bias_gelu(x, b).dtype == torch.float32
    assert err(y, ops.reference_bias_gelu(x.double(), b.double())) <= TOL[torch.float32]


def test_bias_gelu_gradcheck_fp64():
    gradcheck(OPS["bias_gelu"], rand(2, 3, 9, scale=2.0), rand(9))
    gradcheck(lambda x: OPS["bias_gelu"](x, None), rand(2, 3, 9, scale=2.0))


# ---------------------------------------------------------------------------- causal attention

HEADS = [(2, 21), (3, 32)]  # (n_head, head dim): 21 is the seed preset's, padded to 32


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("H,D", HEADS, ids=[f"H{h}-D{d}" for h, d in HEADS])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 17, 64])
def test_causal_attention(T, B, H, D, dtype):
    check_op("causal_attention", (rand(B, T, 3 * H * D), H), dtype, ["y", "dqkv"])


def test_causal_attention_seed_preset_shape():
    """12 heads of 21 (n_embd 252), the whole block of 64."""
    check_op("causal_attention", (rand(2, 64, 3 * 252), 12), torch.float32, ["y", "dqkv"])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,block", [(17, 16), (64, 16), (130, None)], ids=["T17-b16", "T64-b16", "T130-b64"])
def test_causal_attention_many_blocks(T, block, dtype):
    """Several query and key blocks (online-softmax rescaling across blocks, the diagonal block,
    a ragged last block): forced 16-row blocks, or T = 130 in the default blocks of 64."""
    kernel = lambda qkv, h: CausalAttentionFn.apply(qkv, h, block)  # noqa: E731
    check_op("causal_attention", (rand(2, T, 3 * 2 * 21), 2), dtype, ["y", "dqkv"], kernel=kernel)


@pytest.mark.parametrize("layout", ["sliced_columns", "transposed_batch"])
def test_causal_attention_reads_strided_qkv(layout):
    """q/k/v are read through qkv's strides: a column slice of a wider projection, or a batch-
    second tensor transposed, gives the reference's answer with no copy asked of the caller."""
    B, T, H, D = 2, 17, 2, 21
    C = H * D
    if layout == "sliced_columns":
        qkv = rand(B, T, 3 * C + 11)[..., :3 * C]
    else:
        qkv = rand(T, B, 3 * C).transpose(0, 1)
    assert not qkv.is_contiguous()
    check_op("causal_attention", (qkv, H), torch.float32, ["y", "dqkv"])


def test_causal_attention_gradcheck_fp64():
    gradcheck(lambda qkv: OPS["causal_attention"](qkv, 2), rand(1, 5, 3 * 2 * 3))
    # Three 16-row blocks, ragged last one: fast mode (a random projection of the Jacobian)
    # keeps the interpreter's cost to a few evaluations.
    gradcheck(lambda qkv: CausalAttentionFn.apply(qkv, 1, 16), rand(2, 35, 3 * 1 * 5), fast_mode=True)


def test_causal_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        OPS["causal_attention"](torch.zeros(1, 4, 3 * 10, device=DEVICE), 3)
    with pytest.raises(ValueError, match=r"\(B, T, 3\*C\)"):
        OPS["causal_attention"](torch.zeros(1, 4, 10, device=DEVICE), 1)


# ---------------------------------------------------------------------------- cross entropy

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead", [(1, 1), (3, 17)], ids=["1x1", "3x17"])
@pytest.mark.parametrize("V", [7, 50, 2053])
def test_cross_entropy(V, lead, dtype):
    logits = rand(*lead, V, scale=3.0)
    targets = torch.randint(0, V, lead, device=DEVICE)
    if targets.numel() > 1:
        targets.view(-1)[::5] = -1  # ignore_index, as the reference
    check_op("cross_entropy", (logits, targets), dtype, ["loss", "dlogits"])


def test_cross_entropy_all_ignored_and_bad_targets():
    logits = rand(2, 3, 7).float()
    ignored = torch.full((2, 3), -1, device=DEVICE)
    assert torch.isnan(OPS["cross_entropy"](logits, ignored))
    assert torch.isnan(ops.reference_cross_entropy(logits, ignored))
    if DEVICE == "cpu":  # on CUDA the check is an asynchronous device assert
        with pytest.raises(IndexError, match="targets"):
            OPS["cross_entropy"](logits, torch.full((2, 3), 7))


def test_cross_entropy_gradcheck_fp64():
    targets = torch.tensor([[3, -1, 0], [10, 5, 5]], device=DEVICE)
    gradcheck(lambda x: OPS["cross_entropy"](x, targets), rand(2, 3, 11, scale=2.0))


def test_cross_entropy_dtype():
    """fp32 loss for fp32 and fp16 logits (the reference upcasts with .float())."""
    for dtype in DTYPES:
        loss = OPS["cross_entropy"](rand(2, 3, 7).to(dtype), torch.zeros(2, 3, dtype=torch.long, device=DEVICE))
        assert loss.dtype == torch.float32 and loss.dim() == 0 and math.isfinite(loss.item())
