"""Every fused backend (cpp, triton) against the reference ops, outputs and every gradient.

The checks here are the ones all backends face, each run in fp32 and in the backend's low-precision
dtype (bf16 for cpp, fp16 for triton); tests/op_check.py says how results are compared and why the
tolerances are what they are. Checks of one backend alone are in tests/test_cpp_ops.py and
tests/test_triton_kernels.py.

Shapes: widths C = 7, 252 (the seed preset), 1027 (1024 + 3: a ragged power-of-two block) and 4108
(more than one column block); head dim 21 (the seed preset's: not a multiple of the C++ kernels'
8-float vectors, padded to 32 in Triton) and 32; T = 1, 17 and 64; batch 1 and 3. The grids are kept
small so Triton's interpreter finishes in CI on 2 cores.
"""
import math

import pytest
import torch

from mingpt import ops
from mingpt.model import Rotary
from mingpt.ops import reference
from op_check import BACKENDS, DTYPE_IDS, err


def marks(name: str):
    """The Triton backend's tests carry the `triton` mark: the GPU check runs them on the GPU."""
    return pytest.mark.triton if name == "triton" else ()


@pytest.fixture(params=[pytest.param(name, marks=marks(name)) for name in BACKENDS])
def backend(request):
    return BACKENDS[request.param].load()


# Runs a test for each backend (through the fixture above) in fp32 and in the backend's low-precision dtypes.
EACH_BACKEND_AND_DTYPE = pytest.mark.parametrize(
    "backend,dtype",
    [pytest.param(name, dtype, id=f"{name}-{DTYPE_IDS[dtype]}", marks=marks(name))
     for name, b in BACKENDS.items() for dtype in b.dtypes],
    indirect=["backend"])


# ---------------------------------------------------------------------------- the op table

def test_op_table_serves_every_op_from_the_backend(backend):
    table = ops.get_ops(backend.name, backend.device)
    assert set(backend.ops) == set(ops.OP_NAMES)
    # the decode op's fused version (mingpt._C's CUDA kernels) serves CUDA devices only
    decode = "cuda" if backend.device == "cuda" else "reference"
    assert table.sources == {**{op: backend.name if op in ops.OP_NAMES else "reference" for op in ops.REFERENCE_OPS},
                             "cached_attention": decode}
    for op in ops.OP_NAMES:
        assert getattr(table, op) is backend.ops[op]


@pytest.mark.parametrize("op", ["layer_norm", "bias_gelu", "causal_attention", "rotary"])
def test_expanded_upstream_gradient(backend, op):
    """out.sum().backward() hands the backward kernels a stride-0 (expanded) gradient."""
    C = 42
    rand = backend.rand
    inputs = {"layer_norm": (rand(3, 17, C), rand(C), rand(C)), "bias_gelu": (rand(3, 17, C), rand(C)),
              "causal_attention": (rand(3, 17, 3 * C), 2),
              "rotary": (rand(3, 17, 3 * C), *rotary_angles(backend, C // 3, torch.arange(17)[None]), 3)}[op]
    constants = (1, 2) if op == "rotary" else ()

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() if torch.is_tensor(t) and i not in constants else t
                  for i, t in enumerate(inputs)]
        fn(*leaves).sum().backward()
        return [t.grad for t in leaves if torch.is_tensor(t) and t.requires_grad]

    for got, truth in zip(grads(backend.ops[op], torch.float32), grads(ops.REFERENCE_OPS[op], torch.float64)):
        assert err(got, truth) <= backend.tol[torch.float32]


# ---------------------------------------------------------------------------- layer norm

@EACH_BACKEND_AND_DTYPE
@pytest.mark.parametrize("lead", [(1, 1), (3, 17)], ids=["1x1", "3x17"])
@pytest.mark.parametrize("C", [7, 252, 1027])
def test_layer_norm(backend, C, lead, dtype):
    x = backend.rand(*lead, C, scale=2.0, shift=0.5)
    backend.check_op("layer_norm", (x, backend.rand(C, shift=1.0), backend.rand(C)), dtype,
                     ["y", "dx", "dweight", "dbias"])


def test_layer_norm_seed_preset_shape(backend):
    backend.check_op("layer_norm", (backend.rand(2, 64, 252), backend.rand(252, shift=1.0), backend.rand(252)),
                     torch.float32, ["y", "dx", "dweight", "dbias"])


@pytest.mark.parametrize("affine", ["none", "weight_only"])
def test_layer_norm_without_affine_params(backend, affine):
    C = 252
    w = backend.rand(C, shift=1.0) if affine == "weight_only" else None
    names = ["y", "dx", "dweight"] if w is not None else ["y", "dx"]
    backend.check_op("layer_norm", (backend.rand(3, 17, C), w, None), torch.float32, names)


def test_layer_norm_strided_input(backend):
    """A last-dim slice (rows not contiguous with each other) and a transposed batch."""
    C = 252
    w, b = backend.rand(C).float(), backend.rand(C).float()
    for x in (backend.rand(3, 17, C + 9).float()[..., :C], backend.rand(17, 3, C).float().transpose(0, 1)):
        assert not x.is_contiguous()
        truth = reference.reference_layer_norm(x.double(), w.double(), b.double())
        assert err(backend.ops["layer_norm"](x, w, b), truth) <= backend.tol[torch.float32]


def test_layer_norm_mixed_dtypes_like_reference(backend):
    """Low-precision x with fp32 weight and bias: low-precision out, fp32 parameter gradients, as
    F.layer_norm gives on the CPU (on CUDA it refuses mixed dtypes)."""
    x, w, b = (t.requires_grad_() for t in (backend.rand(3, 5, 24).to(backend.low), backend.rand(24).float(),
                                            backend.rand(24).float()))
    y = backend.ops["layer_norm"](x, w, b)
    assert y.dtype == reference.reference_layer_norm(*(t.detach().cpu() for t in (x, w, b))).dtype == backend.low
    y.float().sum().backward()
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (backend.low, torch.float32, torch.float32)


# ---------------------------------------------------------------------------- bias + GELU

@EACH_BACKEND_AND_DTYPE
@pytest.mark.parametrize("lead", [(1, 1), (3, 17)], ids=["1x1", "3x17"])
@pytest.mark.parametrize("N", [7, 252, 1027, 4108])
def test_bias_gelu(backend, N, lead, dtype):
    backend.check_op("bias_gelu", (backend.rand(*lead, N, scale=2.0), backend.rand(N)), dtype, ["y", "dx", "dbias"])


def test_bias_gelu_without_bias_and_saturation(backend):
    """No bias; and inputs far in both tails, where tanh saturates to +-1."""
    tails = torch.linspace(-30, 30, 40, dtype=torch.float64, device=backend.device).expand(3, 1, 40)
    x = torch.cat([backend.rand(3, 17, 40), tails], dim=1)
    backend.check_op("bias_gelu", (x, None), torch.float32, ["y", "dx"])


def test_bias_gelu_mixed_dtypes_promote_like_reference(backend):
    """A low-precision matmul output with an fp32 bias (autocast) gives fp32, as x + bias does, and
    the gradients come back in each input's dtype."""
    x, b = backend.rand(3, 5, 24).to(backend.low).requires_grad_(), backend.rand(24).float().requires_grad_()
    y = backend.ops["bias_gelu"](x, b)
    assert y.dtype == reference.reference_bias_gelu(x, b).dtype == torch.float32
    assert err(y, reference.reference_bias_gelu(x.double(), b.double())) <= backend.tol[torch.float32]
    y.sum().backward()
    assert (x.grad.dtype, b.grad.dtype) == (backend.low, torch.float32)


# ---------------------------------------------------------------------------- causal attention

HEADS = [(2, 21), (3, 32)]  # (n_head, head dim): 21 is the seed preset's


@EACH_BACKEND_AND_DTYPE
@pytest.mark.parametrize("H,D", HEADS, ids=[f"H{h}-D{d}" for h, d in HEADS])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 17, 64])
def test_causal_attention(backend, T, B, H, D, dtype):
    backend.check_op("causal_attention", (backend.rand(B, T, 3 * H * D), H), dtype, ["y", "dqkv"])


@EACH_BACKEND_AND_DTYPE
def test_causal_attention_seed_preset_shape(backend, dtype):
    """12 heads of 21 (n_embd 252), the whole block of 64."""
    backend.check_op("causal_attention", (backend.rand(2, 64, 3 * 252), 12), dtype, ["y", "dqkv"])


@pytest.mark.parametrize("layout", ["sliced_columns", "transposed_batch"])
def test_causal_attention_reads_strided_qkv(backend, layout):
    """q/k/v are read through qkv's strides: a column slice of a wider projection, or a batch-
    second tensor transposed, gives the reference's answer with no copy asked of the caller."""
    B, T, H, D = 2, 17, 2, 21
    C = H * D
    if layout == "sliced_columns":
        qkv = backend.rand(B, T, 3 * C + 11)[..., :3 * C]
    else:
        qkv = backend.rand(T, B, 3 * C).transpose(0, 1)
    assert not qkv.is_contiguous()
    backend.check_op("causal_attention", (qkv, H), torch.float32, ["y", "dqkv"])


def test_causal_attention_rejects_bad_shapes(backend):
    attention = backend.ops["causal_attention"]
    with pytest.raises(ValueError, match="divisible"):
        attention(torch.zeros(1, 4, 3 * 10, device=backend.device), 3)
    with pytest.raises(ValueError, match=r"\(B, T, 3\*C\)"):
        attention(torch.zeros(1, 4, 10, device=backend.device), 1)


# ---------------------------------------------------------------------------- rotary positions

def rotary_angles(backend, head_dim: int, positions):
    """The float32 cos and sin the model hands the op: Rotary's, at positions (1 or B, T)."""
    return [a.to(backend.device) for a in Rotary(head_dim, 64)(positions)]


ROTARY_HEADS = [(2, 14), (3, 32)]  # (n_head, head dim): 32 is the speedrun preset's


@EACH_BACKEND_AND_DTYPE
@pytest.mark.parametrize("H,D", ROTARY_HEADS, ids=[f"H{h}-D{d}" for h, d in ROTARY_HEADS])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 17, 64])
def test_rotary(backend, T, B, H, D, dtype):
    cos, sin = rotary_angles(backend, D, torch.arange(T)[None])
    backend.check_op("rotary", (backend.rand(B, T, 3 * H * D), cos, sin, H), dtype, ["qkv", "dqkv"], fixed=(1, 2))


@EACH_BACKEND_AND_DTYPE
def test_rotary_packed_rows(backend, dtype):
    """Packed rows: each row's positions restart where its reviews begin, so the angles differ by row."""
    B, T, H, D = 3, 64, 6, 32
    positions = torch.arange(T) % torch.tensor([[5], [11], [64]])
    cos, sin = rotary_angles(backend, D, positions)
    assert cos.shape == (B, T, D // 2)
    backend.check_op("rotary", (backend.rand(B, T, 3 * H * D), cos, sin, H), dtype, ["qkv", "dqkv"], fixed=(1, 2))


def test_rotary_rejects_bad_shapes(backend):
    rotary = backend.ops["rotary"]
    angles = torch.zeros(1, 4, 7, device=backend.device)
    with pytest.raises(ValueError, match="heads of an even size"):
        rotary(torch.zeros(1, 4, 3 * 21, device=backend.device), angles, angles, 3)
    with pytest.raises(ValueError, match=r"cos must have shape \(1 or 1, 4, 7\), got \(1, 5, 7\)"):
        rotary(torch.zeros(1, 4, 3 * 28, device=backend.device), torch.zeros(1, 5, 7), angles, 2)
    with pytest.raises(ValueError, match=r"\(B, T, 3\*C\)"):
        rotary(torch.zeros(1, 4, 10, device=backend.device), angles, angles, 1)


# ---------------------------------------------------------------------------- cross entropy

@EACH_BACKEND_AND_DTYPE
@pytest.mark.parametrize("lead", [(1, 1), (3, 17)], ids=["1x1", "3x17"])
@pytest.mark.parametrize("V", [7, 50, 2053])
def test_cross_entropy(backend, V, lead, dtype):
    logits = backend.rand(*lead, V, scale=3.0)
    targets = torch.randint(0, V, lead, device=backend.device)
    if targets.numel() > 1:
        targets.view(-1)[::5] = -1  # ignore_index, as the reference
    backend.check_op("cross_entropy", (logits, targets), dtype, ["loss", "dlogits"])


def test_cross_entropy_all_ignored(backend):
    """Every target ignored: a NaN loss, as the reference's mean over no rows, and a zero gradient."""
    logits = backend.rand(2, 3, 7).float().requires_grad_()
    ignored = torch.full((2, 3), -1, device=backend.device)
    loss = backend.ops["cross_entropy"](logits, ignored)
    assert torch.isnan(loss) and torch.isnan(reference.reference_cross_entropy(logits, ignored))
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_dtype(backend):
    """fp32 loss for fp32 and low-precision logits (the reference upcasts with .float())."""
    targets = torch.zeros(2, 3, dtype=torch.long, device=backend.device)
    for dtype in backend.dtypes:
        loss = backend.ops["cross_entropy"](backend.rand(2, 3, 7).to(dtype), targets)
        assert loss.dtype == torch.float32 and loss.dim() == 0 and math.isfinite(loss.item())
