"""Samplers, and `generate`, which picks one:

  reference  nanoGPT's loop: re-run the whole (cropped) context for every new token
  kvcache    eager PyTorch with a KV cache: the honest neighbour of `cached` in benchmarks
  cached     mingpt._C's KV-cached sampler: on the CPU every step of every sample runs in
             compiled code (mingpt._C.KVSampler); on CUDA, the kvcache loop, whose fused op table
             brings the extension's cache-append and single-query attention kernels
  auto       cached where it can run for the model, else reference

Context policy, shared by every sampler: the model sees at most the last `block_size` tokens;
past the block, each step re-reads that sliding window. Cached keys cannot serve there (every
token's position changes when the window slides), so the cached samplers re-prefill the cache
from the last window at each such step: the reference's logits at the reference's cost.
"""
import dataclasses
import queue
import threading
import warnings
import weakref

import torch

from . import extension
from .tokenizer import SENTIMENT_TOKENS, UnknownCharacterError

SAMPLERS = ("auto", "reference", "kvcache", "cached")

# The interface version of mingpt._C.KVSampler this module was written for (its SAMPLER_VERSION).
SAMPLER_VERSION = 3

# The formats the compiled sampler holds the weight matrices in: fp32 (exact), bf16, int8 (per-row scales).
WEIGHT_FORMATS = ("fp32", "bf16", "int8")


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


@torch.no_grad()
def kvcache_generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                     eos_id=None, generator=None, callback=None):
    """The model's own forward with a KV cache: prefill the (cropped) prompt, then one position per step."""
    block = model.config.block_size
    cache = model.new_cache(idx.shape[0])
    prompt_length = idx.shape[1]

    def next_logits(seq):
        length = seq.shape[1]
        if length == prompt_length or length > block:  # the prompt, or a slid window: prefill
            return model(seq[:, -block:], cache=cache)[0][:, -1]
        return model(seq[:, -1:], cache=cache, start=length - 1)[0][:, -1]

    return _decode_loop(next_logits, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, callback)


# model -> {weight format: (parameter key, mingpt._C.KVSampler)}: packed weights live as long as their model.
_packed_samplers = weakref.WeakKeyDictionary()


def packed_sampler(model, weights="fp32"):
    """The model's weights packed (quantised once) in format `weights` for the compiled sampler, packed
    again only after they change."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    key = (dataclasses.astuple(model.config),
           tuple((p.data_ptr(), p._version) for p in model.parameters()))
    formats = _packed_samplers.setdefault(model, {})
    hit = formats.get(weights)
    if hit is not None and hit[0] == key:
        return hit[1]
    sampler = extension.require_extension().KVSampler(model.state_dict(), dataclasses.asdict(model.config),
                                                      weight_format=weights)
    formats[weights] = (key, sampler)
    return sampler


# Below this many bytes of weights a step's phases take microseconds, less than the barriers
# between threads cost: one thread is faster.
PARALLEL_MIN_BYTES = 1 << 20


def cached_generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                    seed=None, callback=None, weights="fp32"):
    """One call into mingpt._C.KVSampler (CPU) with the weights in format `weights`; without a seed,
    torch's global generator draws one."""
    if seed is None:
        seed = int(torch.randint(2 ** 62, (1,)))
    sampler = packed_sampler(model, weights)
    threads = torch.get_num_threads() if sampler.packed_bytes >= PARALLEL_MIN_BYTES else 1
    return sampler.generate(
        idx, max_new_tokens, temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
        eos_id=-1 if eos_id is None else eos_id, seed=seed % 2 ** 64, num_threads=threads, callback=callback)


def cached_sampler_unavailable_reason(model=None):
    """None when the cached sampler can run (for `model`, if given), else why not."""
    _C = extension._C
    if _C is None:
        return extension.UNAVAILABLE_REASON
    if getattr(_C, "SAMPLER_VERSION", None) != SAMPLER_VERSION:
        return (f"mingpt._C is a stale build (its KV-cached sampler is version "
                f"{getattr(_C, 'SAMPLER_VERSION', 'none')}, this code needs {SAMPLER_VERSION}); "
                f"{extension.REBUILD_HINT}")
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
             seed=None, sampler="auto", callback=None, weights="fp32"):
    """Continue each prompt row of idx; rows that emit eos_id are padded with it afterwards.

    callback, if given, receives each new column of tokens as a list (one id per row). weights: the
    format the compiled CPU sampler holds the weight matrices in (WEIGHT_FORMATS); bf16 and int8 run
    there only.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    check_sampling_args(idx, max_new_tokens, temperature, top_k, top_p, model.config.vocab_size, eos_id)
    name = resolve_sampler(sampler, model)
    if name == "cached":
        reason = cached_sampler_unavailable_reason(model)
        if reason is not None:
            raise RuntimeError(f"sampler 'cached' is not available: {reason}")
        if idx.device.type == "cpu":
            return cached_generate(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, seed, callback,
                                   weights)
    if weights != "fp32":
        raise ValueError(f"{weights} weights run in the compiled CPU sampler only, not in the {name} sampler "
                         f"on {idx.device.type}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    loops = {"reference": reference_generate, "kvcache": kvcache_generate, "cached": kvcache_generate}
    was_training = model.training
    model.eval()
    try:
        return loops[name](model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, callback)
    finally:
        model.train(was_training)


@torch.no_grad()
def draw_sentiments(model, tokenizer, context_id: int, n: int, generator) -> list:
    """Sentiments drawn from the model's own p(<pos>|<neg> given the context token)."""
    names = list(SENTIMENT_TOKENS)
    ids = torch.tensor([tokenizer.token_id(SENTIMENT_TOKENS[s]) for s in names])
    logits, _ = model(torch.tensor([[context_id]], device=model.device))
    probs = logits[0, -1, ids.to(model.device)].float().softmax(-1).cpu()
    return [names[i] for i in torch.multinomial(probs, n, replacement=True, generator=generator).tolist()]


class StopGeneration(Exception):
    """Raised by a `generate` callback to end the generation after the column it was given."""


class IncrementalDecoder:
    """One sample's text as its tokens arrive: `feed(id)` returns only whole characters, never half a
    UTF-8 sequence or half a BPE piece (a byte-level BPE token can end mid-character: its text is held
    back until the character completes); special tokens read as nothing."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pending = tokenizer, []  # the tokens of a character not yet complete

    def feed(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            return ""
        self.pending = []
        return text


_DONE = object()


def generate_stream(model, idx, max_new_tokens, **options):
    """`generate` as an iterator over its new columns (one token id per row, each step as it is made);
    closing the iterator early stops the generation at its next step. Options are generate's."""
    columns, stop = queue.Queue(), threading.Event()

    def callback(column):
        if stop.is_set():
            raise StopGeneration
        columns.put(column)

    def run():
        try:
            generate(model, idx, max_new_tokens, callback=callback, **options)
        except StopGeneration:
            pass
        except BaseException as e:  # handed to the consumer's thread
            columns.put(e)
        columns.put(_DONE)

    thread = threading.Thread(target=run, name="mingpt-generate-stream", daemon=True)
    thread.start()
    try:
        while (item := columns.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def check_prompt_fits(model, start_ids: list, what: str):
    if len(start_ids) + 2 > model.config.block_size:
        raise ValueError(f"{what} is {len(start_ids)} tokens; with its 2 prefix tokens it must fit the "
                         f"block of {model.config.block_size}")


def prompt_row(tokenizer, layout, sentiment: str, start_ids: list) -> list:
    """A review's prompt: the layout's context token, the sentiment token, then the start of its text."""
    return [tokenizer.token_id(layout.context_token), tokenizer.token_id(SENTIMENT_TOKENS[sentiment])] + start_ids


def review_prompts(model, tokenizer, layout, start: str, sentiments, num_samples: int, generator=None):
    """The prompt rows of num_samples reviews of `layout` that begin with `start`: (sentiment of each,
    rows of token ids). sentiments is "pos", "neg", "auto" (the model draws each) or a list, one per row."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    try:
        start_ids = tokenizer.encode(start)
    except UnknownCharacterError as e:
        raise UnknownCharacterError(f"--start {start!r}: {e}") from None
    context_id = tokenizer.token_id(layout.context_token)
    if sentiments == "auto":
        sentiments = draw_sentiments(model, tokenizer, context_id, num_samples, generator)
    elif isinstance(sentiments, str):
        sentiments = [sentiments] * num_samples
    check_prompt_fits(model, start_ids, "--start")
    return sentiments, [prompt_row(tokenizer, layout, s, start_ids) for s in sentiments]


def write_samples(model, tokenizer, layout, start: str, sentiment: str, num_samples: int, max_new_tokens: int,
                  temperature=0.8, top_k=None, top_p=None, seed=None, sampler="auto", on_text=None, weights="fp32"):
    """Returns [(sentiment, text)] for num_samples reviews of `layout` (mingpt.layouts) that begin with `start`.

    on_text(row, piece, sentiment), if given, receives each sample's text as it is written, in whole
    characters: first `start`, then each new piece, then None when the sample reaches its end token;
    a row's pieces add up to its returned text.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sentiments, prompts = review_prompts(model, tokenizer, layout, start, sentiment, num_samples, generator)
    idx = torch.tensor(prompts, dtype=torch.long, device=model.device)
    eos_id = tokenizer.token_id(layout.end_token)
    callback = None
    if on_text is not None:
        decoders = [IncrementalDecoder(tokenizer) for _ in prompts]
        ended = [False] * num_samples
        for row in range(num_samples):
            on_text(row, start, sentiments[row])

        def callback(column):
            for row, token in enumerate(column):
                if ended[row]:
                    continue
                ended[row] = token == eos_id
                piece = None if ended[row] else decoders[row].feed(token)
                if piece != "":
                    on_text(row, piece, sentiments[row])
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=eos_id, seed=seed, sampler=sampler, callback=callback, weights=weights)
    prompt_length = len(prompts[0]) - 2
    texts = []
    for row in out[:, 2:].tolist():
        if eos_id in row[prompt_length:]:
            row = row[:row.index(eos_id, prompt_length)]
        texts.append(tokenizer.decode(row))
    return list(zip(sentiments, texts))
