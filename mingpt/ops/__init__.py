"""The op table: one name per hot-path op, several backends behind it.

Backends:
  reference  plain PyTorch, the oracle for every test and the baseline of every benchmark
  sdpa       reference, with attention through torch's scaled_dot_product_attention
  triton     Triton kernels (mingpt.kernels.op_table); CUDA, or CPU tensors under TRITON_INTERPRET=1
  cpp        C++ CPU kernels from the compiled extension (mingpt.ops.cpp)
  fused      the fast backend for the device: triton on CUDA, cpp on CPU
  auto       fused where it is available, else reference

The training ops (OP_NAMES) are provided by every fused backend, `rotary` (rotary positions, which the
speedrun preset uses) among them; the decode op `cached_attention` (attention against a KV cache, for
prefill and decode) has a fused version only on CUDA, from mingpt._C; the ops of the architecture options
the presets leave off (`rms_norm`, `bias_relu2`) run the reference on every backend. A backend may provide only
some ops; the rest run the reference op, and `Ops.sources` says which op came from where.

The package's modules: reference (the reference ops and the input checks every backend shares),
cpp and cuda (the extension's ops registered with torch.library), extension (loading mingpt._C).
The Triton kernels are the top-level kernels/ folder, installed as mingpt.kernels.
"""
import importlib
import os

import torch
import torch.nn.functional as F

from .reference import REFERENCE_OPS, check_starts, merge_heads, split_heads, visible_keys

OP_NAMES = ("layer_norm", "bias_gelu", "causal_attention", "cross_entropy", "dropout", "rotary")
BACKENDS = ("reference", "sdpa", "triton", "cpp", "fused", "auto")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def sdpa_causal_attention(qkv, n_head: int, starts=None):
    check_starts(starts, qkv)
    q, k, v = split_heads(qkv, n_head)
    if starts is None:
        return merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=visible_keys(starts, q.shape[2], q.device)))


class Ops:
    """One backend's table: every op of REFERENCE_OPS as an attribute (ops.layer_norm(...)), `name`, and
    `sources`, which says which provider each op came from."""

    def __init__(self, name: str, table: dict, sources: dict):
        self.name, self.sources = name, sources
        self.__dict__.update(table)

    @classmethod
    def build(cls, name: str, providers: dict):
        """providers: provider name -> {op name: callable}; a later provider overrides an earlier one."""
        table, sources = dict(REFERENCE_OPS), {op: "reference" for op in REFERENCE_OPS}
        for provider, provided in providers.items():
            unknown = set(provided) - set(REFERENCE_OPS)
            if unknown:
                raise ValueError(f"backend {name!r} provides unknown ops: {sorted(unknown)}")
            table.update(provided)
            sources.update({op: provider for op in provided})
        return cls(name, table, sources)


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
    providers = {"triton": _import_backend_ops("mingpt.kernels.op_table", "triton")}
    if device.type == "cuda":
        try:
            providers["cuda"] = _import_backend_ops("mingpt.ops.cuda", "cuda")
        except BackendUnavailable:
            pass  # the extension's CUDA decode kernels are optional: the reference cached attention serves
    return Ops.build("triton", providers)


def _cpp_ops(device: torch.device) -> Ops:
    if device.type != "cpu":
        raise BackendUnavailable(f"backend 'cpp' runs on the CPU only (got {device.type})")
    return Ops.build("cpp", {"cpp": _import_backend_ops("mingpt.ops.cpp", "cpp")})


def get_ops(backend: str = "auto", device="cpu") -> Ops:
    """Resolve a backend name to an op table for `device`; raises BackendUnavailable with a reason."""
    device = torch.device(device)
    if backend == "reference":
        return Ops.build("reference", {})
    if backend == "sdpa":
        return Ops.build("sdpa", {"sdpa": {"causal_attention": sdpa_causal_attention}})
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
