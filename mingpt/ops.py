"""The op table: one name per hot-path op, several backends behind it.

Backends:
  reference  plain PyTorch, the oracle for every test and the baseline of every benchmark
  sdpa       reference, with attention through torch's scaled_dot_product_attention
  triton     Triton kernels (mingpt.kernels.op_table); CUDA, or CPU tensors under TRITON_INTERPRET=1
  cpp        C++ CPU kernels from the compiled extension (mingpt.cpp_ops)
  fused      the fast backend for the device: triton on CUDA, cpp on CPU
  auto       fused where it is available, else reference

A fused backend may provide only some ops; the rest run the reference op, and
`Ops.sources` says which op came from where.
"""
import importlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OP_NAMES = ("layer_norm", "bias_gelu", "causal_attention", "cross_entropy", "dropout")
BACKENDS = ("reference", "sdpa", "triton", "cpp", "fused", "auto")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def check_qkv(qkv: torch.Tensor, n_head: int):
    if qkv.dim() != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"causal_attention expects qkv of shape (B, T, 3*C), got {tuple(qkv.shape)}")
    n_embd = qkv.shape[-1] // 3
    if n_head < 1 or n_embd % n_head:
        raise ValueError(f"causal_attention: C={n_embd} is not divisible by n_head={n_head}")


def reference_layer_norm(x, weight, bias, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def reference_bias_gelu(x, bias):
    return F.gelu(x + bias if bias is not None else x, approximate="tanh")


def reference_causal_attention(qkv, n_head: int):
    check_qkv(qkv, n_head)
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // n_head))
    causal = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
    att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return (att @ v).transpose(1, 2).reshape(B, T, C)


def sdpa_causal_attention(qkv, n_head: int):
    check_qkv(qkv, n_head)
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, C)


def reference_cross_entropy(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=-1)


def check_dropout_rate(p: float):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")


def reference_dropout(x, p: float, training: bool):
    check_dropout_rate(p)
    return F.dropout(x, p, training)


REFERENCE_OPS = {
    "layer_norm": reference_layer_norm,
    "bias_gelu": reference_bias_gelu,
    "causal_attention": reference_causal_attention,
    "cross_entropy": reference_cross_entropy,
    "dropout": reference_dropout,
}


@dataclass(frozen=True)
class Ops:
    name: str
    layer_norm: callable
    bias_gelu: callable
    causal_attention: callable
    cross_entropy: callable
    dropout: callable
    sources: dict

    @classmethod
    def build(cls, name: str, provided: dict, provider: str):
        unknown = set(provided) - set(OP_NAMES)
        if unknown:
            raise ValueError(f"backend {name!r} provides unknown ops: {sorted(unknown)}")
        table = {op: provided.get(op, REFERENCE_OPS[op]) for op in OP_NAMES}
        sources = {op: provider if op in provided else "reference" for op in OP_NAMES}
        return cls(name=name, sources=sources, **table)


def _import_backend_ops(module_name: str, backend: str) -> dict:
    """A backend module exposes OPS (op name -> callable) or raises ImportError saying why."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendUnavailable(f"backend {backend!r} is not available: {e}") from None
    return module.OPS


def _triton_ops(device: torch.device) -> Ops:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable(
            f"backend 'triton' needs a CUDA device (got {device.type}); on a CPU it runs only in "
            "Triton's interpreter, with TRITON_INTERPRET=1 set before triton is imported")
    return Ops.build("triton", _import_backend_ops("mingpt.kernels.op_table", "triton"), "triton")


def _cpp_ops(device: torch.device) -> Ops:
    if device.type != "cpu":
        raise BackendUnavailable(f"backend 'cpp' runs on the CPU only (got {device.type})")
    return Ops.build("cpp", _import_backend_ops("mingpt.cpp_ops", "cpp"), "cpp")


def get_ops(backend: str = "auto", device="cpu") -> Ops:
    """Resolve a backend name to an op table for `device`; raises BackendUnavailable with a reason."""
    device = torch.device(device)
    if backend == "reference":
        return Ops.build("reference", {}, "reference")
    if backend == "sdpa":
        return Ops.build("sdpa", {"causal_attention": sdpa_causal_attention}, "sdpa")
    if backend == "triton":
        return _triton_ops(device)
    if backend == "cpp":
        return _cpp_ops(device)
    if backend == "fused":
        return _triton_ops(device) if device.type == "cuda" else _cpp_ops(device)
    if backend == "auto":
        try:
            return get_ops("fused", device)
        except BackendUnavailable:
            return get_ops("reference", device)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
