"""Samplers, and `generate`, which picks one:

  reference  nanoGPT's loop: re-run the whole (cropped) context for every new token
  kvcache    eager PyTorch with a KV cache: the honest neighbour of `cached` in benchmarks
  cached     mingpt._C's KV-cached sampler: on the CPU every step of every sample runs in
             compiled code (mingpt._C.KVSampler); on CUDA, the kvcache loop with the extension's
             cache-append and single-query attention kernels
  auto       cached where it can run for the model, else reference

Context policy, shared by every sampler: the model sees at most the last `block_size` tokens;
past the block, each step re-reads that sliding window. Cached keys cannot serve there (every
token's position changes when the window slides), so the cached samplers re-prefill the cache
from the last window at each such step: the reference's logits at the reference's cost.
"""
import dataclasses
import warnings
import weakref

import torch
import torch.nn.functional as F

SAMPLERS = ("auto", "reference", "kvcache", "cached")

# The interface version of mingpt._C.KVSampler this module was written for (its SAMPLER_VERSION).
SAMPLER_VERSION = 2


def check_sampling_args(idx, max_new_tokens, temperature, top_k, top_p, vocab_size, eos_id=None):
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError("idx must be a LongTensor of shape (batch, prompt_length)")
    if idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"idx must hold at least one prompt of at least one token, got shape {tuple(idx.shape)}")
    if int(idx.min()) < 0 or int(idx.max()) >= vocab_size:
        raise ValueError(f"idx holds token ids outside [0, {vocab_size})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id must be a token id in [0, {vocab_size}), got {eos_id}")


def next_token_probs(logits, temperature, top_k=None, top_p=None):
    """Probabilities over the vocabulary after temperature, top-k and top-p (nucleus) filtering."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it does.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def pick_next(logits, temperature, top_k, top_p, generator):
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator)


def _decode_loop(next_logits, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, callback):
    """The loop every Python sampler shares; next_logits(idx) gives each row's next-token logits."""
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        next_id = pick_next(next_logits(idx), temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)
            finished |= next_id.squeeze(1) == eos_id
        idx = torch.cat([idx, next_id], dim=1)
        if callback is not None:
            callback(next_id.squeeze(1).tolist())
        if eos_id is not None and bool(finished.all()):
            break
    return idx


@torch.no_grad()
def reference_generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                       eos_id=None, generator=None, callback=None):
    """The plain loop: re-run the whole (cropped) context for every new token."""
    block_size = model.config.block_size
    return _decode_loop(lambda seq: model(seq[:, -block_size:])[0][:, -1, :], idx, max_new_tokens,
                        temperature, top_k, top_p, eos_id, generator, callback)


def _attend_torch(k_cache, v_cache, q, k, v, start):
    """Write k, v (B, H, T, hd) at positions start.. of the cache; attend q to positions 0..start+T-1."""
    end = start + q.shape[2]
    k_cache[:, :, start:end] = k
    v_cache[:, :, start:end] = v
    # Several queries come only in a prefill, which starts at position 0: causal from the top left.
    return F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], is_causal=q.shape[2] > 1)


def _attend_cuda_kernels(k_cache, v_cache, q, k, v, start):
    """_attend_torch with mingpt._C's CUDA kernels for the single-query (decode) steps."""
    if q.shape[2] > 1:
        return _attend_torch(k_cache, v_cache, q, k, v, start)
    torch.ops.mingpt.kv_cache_append(k_cache, v_cache, k, v, start)
    return torch.ops.mingpt.decode_attention(q.contiguous(), k_cache, v_cache, start + 1)


def _kv_forward(model, tokens, start, cache, attend):
    """Logits after the last of `tokens` (B, T) at positions start.., reading and extending `cache`."""
    tr, cfg = model.transformer, model.config
    B, T = tokens.shape
    C, H = cfg.n_embd, cfg.n_head
    x = tr.wte(tokens) + tr.wpe.weight[start:start + T]
    for block, (k_cache, v_cache) in zip(tr.h, cache):
        h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias, 1e-5)
        q, k, v = block.attn.c_attn(h).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        y = attend(k_cache, v_cache, q, k, v, start)
        x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias, 1e-5)
        x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(h), approximate="tanh"))
    x = F.layer_norm(x[:, -1], (C,), tr.ln_f.weight, tr.ln_f.bias, 1e-5)
    return model.lm_head(x)


@torch.no_grad()
def kvcache_generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                     eos_id=None, generator=None, callback=None, attend=_attend_torch):
    """Eager PyTorch with a KV cache: prefill the (cropped) prompt, then one position per step."""
    cfg = model.config
    block = cfg.block_size
    weight = model.transformer.wte.weight
    shape = (idx.shape[0], cfg.n_head, block, cfg.n_embd // cfg.n_head)
    cache = [(torch.empty(shape, dtype=weight.dtype, device=weight.device),
              torch.empty(shape, dtype=weight.dtype, device=weight.device)) for _ in range(cfg.n_layer)]
    prompt_length = idx.shape[1]

    def next_logits(seq):
        length = seq.shape[1]
        if length == prompt_length or length > block:  # the prompt, or a slid window: prefill
            return _kv_forward(model, seq[:, -block:], 0, cache, attend)
        return _kv_forward(model, seq[:, -1:], length - 1, cache, attend)

    return _decode_loop(next_logits, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, callback)


# model -> (parameter key, mingpt._C.KVSampler): packed weights live as long as their model.
_packed_samplers = weakref.WeakKeyDictionary()


def packed_sampler(model):
    """The model's weights packed for the compiled sampler, packed again only after they change."""
    from .extension import require_extension
    key = (dataclasses.astuple(model.config),
           tuple((p.data_ptr(), p._version) for p in model.parameters()))
    hit = _packed_samplers.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    sampler = require_extension().KVSampler(model.state_dict(), dataclasses.asdict(model.config))
    _packed_samplers[model] = (key, sampler)
    return sampler


# Below this many bytes of weights a step's phases take microseconds, less than the barriers
# between threads cost: one thread is faster.
PARALLEL_MIN_BYTES = 1 << 20


def cached_generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                    seed=None, callback=None):
    """One call into mingpt._C.KVSampler (CPU); without a seed, torch's global generator draws one."""
    if seed is None:
        seed = int(torch.randint(2 ** 62, (1,)))
    sampler = packed_sampler(model)
    threads = torch.get_num_threads() if sampler.packed_bytes >= PARALLEL_MIN_BYTES else 1
    return sampler.generate(
        idx, max_new_tokens, temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
        eos_id=-1 if eos_id is None else eos_id, seed=seed % 2 ** 64, num_threads=threads, callback=callback)


def cached_sampler_unavailable_reason(model=None):
    """None when the cached sampler can run (for `model`, if given), else why not."""
    from .extension import REBUILD_HINT, UNAVAILABLE_REASON, _C
    if _C is None:
        return UNAVAILABLE_REASON
    if getattr(_C, "SAMPLER_VERSION", None) != SAMPLER_VERSION:
        return (f"mingpt._C is a stale build (its KV-cached sampler is version "
                f"{getattr(_C, 'SAMPLER_VERSION', 'none')}, this code needs {SAMPLER_VERSION}); {REBUILD_HINT}")
    if model is None:
        return None
    weight = model.transformer.wte.weight
    if weight.dtype != torch.float32:
        return f"the cached sampler runs float32 weights; this model's are {weight.dtype}"
    if weight.device.type == "cuda" and not _C.build_info()["cuda"]:
        return f"mingpt._C was built without CUDA, and the model is on {weight.device}"
    if weight.device.type not in ("cpu", "cuda"):
        return f"the cached sampler runs on the CPU or CUDA, not {weight.device}"
    return None


def resolve_sampler(sampler: str, model=None) -> str:
    """The sampler that `sampler` names here: auto is cached where it can run, else reference."""
    if sampler != "auto":
        return sampler
    reason = cached_sampler_unavailable_reason(model)
    if reason is None:
        return "cached"
    if model is None or cached_sampler_unavailable_reason() is not None:  # the build, not the model
        warnings.warn(f"sampling with the reference loop: {reason}", RuntimeWarning, stacklevel=2)
    return "reference"


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
             seed=None, sampler="auto", callback=None):
    """Continue each prompt row of idx; rows that emit eos_id are padded with it afterwards.

    callback, if given, receives each new column of tokens as a list (one id per row).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    check_sampling_args(idx, max_new_tokens, temperature, top_k, top_p, model.config.vocab_size, eos_id)
    name = resolve_sampler(sampler, model)
    if name == "cached":
        reason = cached_sampler_unavailable_reason(model)
        if reason is not None:
            raise RuntimeError(f"sampler 'cached' is not available: {reason}")
        if idx.device.type == "cpu":
            return cached_generate(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, seed, callback)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    loops = {"reference": reference_generate, "kvcache": kvcache_generate,
             "cached": lambda *args: kvcache_generate(*args, attend=_attend_cuda_kernels)}
    was_training = model.training
    model.eval()
    try:
        return loops[name](model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, callback)
    finally:
        model.train(was_training)
