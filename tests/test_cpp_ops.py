"""The C++ CPU kernels (mingpt.cpp_ops, from mingpt._C): the checks only they face.

The checks every fused backend faces, in fp32 and bf16, are in tests/test_fused_ops.py;
tests/op_check.py says how results are compared and why the tolerances are what they are. Here: the
extension missing or stale, the dtypes under CPU autocast, the errors of the kernels' own input
checks, empty inputs, longer blocks, the seed preset's cross-entropy shape and bad targets.

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

from mingpt import extension, ops, reference
from op_check import BACKENDS

CPP = BACKENDS["cpp"].load()
OPS = CPP.ops
rand = CPP.rand


# ---------------------------------------------------------------------------- the op table

def test_fused_and_auto_on_cpu_serve_every_op_from_cpp():
    for backend in ("fused", "auto"):
        table = ops.get_ops(backend, "cpu")
        # the decode op has no CPU kernel of its own (the compiled sampler decodes on the CPU)
        assert table.sources == {**{op: "cpp" for op in ops.OP_NAMES}, "cached_attention": "reference"}, backend
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
