"""Samplers: the reference no-cache loop (nanoGPT-style) and the dispatch to faster ones.

Context policy, shared by every sampler: the model sees at most the last `block_size` tokens;
past the block, each step re-reads that sliding window.
"""
import torch

SAMPLERS = ("auto", "reference", "cached")


def check_sampling_args(idx, max_new_tokens, temperature, top_k, top_p, vocab_size):
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


@torch.no_grad()
def reference_generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                       eos_id=None, generator=None):
    """The plain loop: re-run the whole (cropped) context for every new token."""
    block_size = model.config.block_size
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -block_size:])
        next_id = pick_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)
            finished |= next_id.squeeze(1) == eos_id
        idx = torch.cat([idx, next_id], dim=1)
        if eos_id is not None and bool(finished.all()):
            break
    return idx


def cached_sampler_unavailable_reason():
    """None when the compiled KV-cached sampler can run, else why not."""
    return "the compiled KV-cached sampler is not part of mingpt._C yet"


def resolve_sampler(sampler: str) -> str:
    """The sampler that `sampler` names here: auto is cached where it is built, else reference."""
    if sampler == "auto":
        return "cached" if cached_sampler_unavailable_reason() is None else "reference"
    return sampler


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
             seed=None, sampler="auto"):
    """Continue each prompt row of idx; rows that emit eos_id are padded with it afterwards."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    check_sampling_args(idx, max_new_tokens, temperature, top_k, top_p, model.config.vocab_size)
    if resolve_sampler(sampler) == "cached":
        raise RuntimeError(f"sampler 'cached' is not available: {cached_sampler_unavailable_reason()}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        return reference_generate(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator)
    finally:
        model.train(was_training)
