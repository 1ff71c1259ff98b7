"""The CUDA decode op of the op table: cached attention with mingpt._C's cache-append and
single-query attention kernels (csrc/cuda). Prefill steps (several queries) and decode steps whose rows sit at
different positions (the server's running batch) run the reference op."""
import torch

from .extension import UNAVAILABLE_REASON, _C
from .reference import check_cache, merge_heads, reference_cached_attention, split_heads

if _C is None:
    raise ImportError(UNAVAILABLE_REASON)
if not _C.build_info()["cuda"]:
    raise ImportError("mingpt._C was built without CUDA")


def cached_attention(qkv, n_head: int, k_cache, v_cache, start):
    if qkv.shape[1] > 1 or isinstance(start, torch.Tensor):
        return reference_cached_attention(qkv, n_head, k_cache, v_cache, start)
    check_cache(qkv, k_cache, v_cache, start)
    q, k, v = split_heads(qkv, n_head)
    torch.ops.mingpt.kv_cache_append(k_cache, v_cache, k, v, start)
    return merge_heads(torch.ops.mingpt.decode_attention(q.contiguous(), k_cache, v_cache, start + 1))


OPS = {"cached_attention": cached_attention}
