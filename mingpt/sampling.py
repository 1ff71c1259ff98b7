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
from .logit_controls import LogitControls, apply_controls
from .tokenizer import PAD, SENTIMENT_TOKENS, UnknownCharacterError

SAMPLERS = ("auto", "reference", "kvcache", "cached")

# The interface version of mingpt._C.KVSampler this module was written for (its SAMPLER_VERSION).
SAMPLER_VERSION = 6

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


def _decode_loop(next_logits, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, callback,
                 controls=LogitControls(), guidance_idx=None):
    """The loop every Python sampler shares. next_logits(seq, kept) gives the next-token logits of the
    running rows `seq` (kept: which rows of the previous call's seq still run, None if all do); rows
    that end (eos_id, or retired by the callback) are padded with eos_id and no longer computed.
    Guided, the rows of guidance_idx run beside those of idx (after them) and take the same tokens."""
    batch = idx.shape[0]
    seq = idx if not controls.guided else torch.cat([idx, guidance_idx])
    running = torch.arange(batch, device=idx.device)
    kept = None
    for step in range(max_new_tokens):
        rows, model_kept = running, kept
        if controls.guided:  # the guidance rows follow the running rows, in the same order
            rows = torch.cat([running, running + batch])
            model_kept = None if kept is None else torch.cat([kept, kept + previously_running])
        logits = apply_controls(next_logits(seq[rows], model_kept), seq[running], controls, step)
        picked = pick_next(logits, temperature, top_k, top_p, generator).squeeze(1)
        column = torch.full_like(idx[:, 0], -1 if eos_id is None else eos_id).index_copy(0, running, picked)
        seq = torch.cat([seq, column.repeat(2 if controls.guided else 1).unsqueeze(1)], dim=1)
        ended = picked == eos_id if eos_id is not None else torch.zeros_like(running, dtype=torch.bool)
        if callback is not None:
            retired = check_retired_rows(callback(column.tolist()), batch, eos_id)
            ended |= torch.isin(running, torch.tensor(retired, dtype=torch.long, device=idx.device))
        if bool(ended.any()):
            kept, previously_running = (~ended).nonzero().squeeze(1), len(running)
            running = running[kept]
        else:
            kept = None
        if running.numel() == 0:
            break
    return seq[:batch]


def check_retired_rows(retired, batch: int, eos_id) -> list:
    """A callback's answer: None, or the rows (indices into the batch) to stop after this column."""
    if retired is None:
        return []
    retired = list(retired)
    if any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < batch for r in retired):
        raise ValueError(f"a generate callback returns None or row indices in [0, {batch}), got {retired}")
    if retired and eos_id is None:
        raise ValueError("a generate callback retired rows, but there is no eos_id to pad them with")
    return retired


@torch.no_grad()
def reference_generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                       eos_id=None, generator=None, callback=None, controls=LogitControls(), guidance_idx=None):
    """The plain loop: re-run the whole (cropped) context for every new token."""
    block_size = model.config.block_size
    return _decode_loop(lambda seq, kept: model(seq[:, -block_size:])[0][:, -1, :], idx, max_new_tokens,
                        temperature, top_k, top_p, eos_id, generator, callback, controls, guidance_idx)


@torch.no_grad()
def kvcache_generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                     eos_id=None, generator=None, callback=None, controls=LogitControls(), guidance_idx=None):
    """The model's own forward with a KV cache: prefill the (cropped) prompt, then one position per step."""
    block = model.config.block_size
    cache = model.new_cache(idx.shape[0] * (2 if controls.guided else 1))
    prompt_length = idx.shape[1]

    def next_logits(seq, kept):
        if kept is not None:
            cache.keep_rows(kept)
        length = seq.shape[1]
        if length == prompt_length or length > block:  # the prompt, or a slid window: prefill
            return model(seq[:, -block:], cache=cache)[0][:, -1]
        return model(seq[:, -1:], cache=cache, start=length - 1)[0][:, -1]

    return _decode_loop(next_logits, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, callback,
                        controls, guidance_idx)


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
                    seed=None, callback=None, controls=LogitControls(), guidance_idx=None, weights="fp32"):
    """One call into mingpt._C.KVSampler (CPU) with the weights in format `weights`; without a seed,
    torch's global generator draws one."""
    if seed is None:
        seed = int(torch.randint(2 ** 62, (1,)))
    sampler = packed_sampler(model, weights)
    threads = torch.get_num_threads() if sampler.packed_bytes >= PARALLEL_MIN_BYTES else 1
    return sampler.generate(
        idx, max_new_tokens, temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
        eos_id=-1 if eos_id is None else eos_id, seed=seed % 2 ** 64, num_threads=threads, callback=callback,
        guidance_idx=guidance_idx if controls.guided else None, **dataclasses.asdict(controls))


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
             seed=None, sampler="auto", callback=None, guidance=1.0, guidance_idx=None, repetition_penalty=1.0,
             no_repeat_ngram_size=0, weights="fp32", guidance_tokens=0, guidance_after=1.0):
    """Continue each prompt row of idx; rows that emit eos_id are padded with it afterwards.

    callback, if given, receives each new column of tokens as a list (one id per row; rows that have
    ended show eos_id); it may return row indices to stop after that column (a client went away):
    they are padded with eos_id like rows that emitted it, and no longer computed.
    guidance (with guidance_idx: each row's prompt under the second conditioning, idx's shape),
    guidance_tokens, guidance_after, repetition_penalty and no_repeat_ngram_size: see
    mingpt.logit_controls. weights: the format the compiled CPU sampler holds the weight matrices in
    (WEIGHT_FORMATS); bf16 and int8 run there only.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    check_sampling_args(idx, max_new_tokens, temperature, top_k, top_p, model.config.vocab_size, eos_id)
    controls = LogitControls(guidance, repetition_penalty, no_repeat_ngram_size, guidance_tokens, guidance_after)
    if controls.guided:
        check_guidance_idx(idx, guidance_idx, model.config.vocab_size)
    name = resolve_sampler(sampler, model)
    if name == "cached":
        reason = cached_sampler_unavailable_reason(model)
        if reason is not None:
            raise RuntimeError(f"sampler 'cached' is not available: {reason}")
        if idx.device.type == "cpu":
            return cached_generate(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, seed, callback,
                                   controls, guidance_idx, weights)
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
        return loops[name](model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, callback,
                           controls, guidance_idx)
    finally:
        model.train(was_training)


def check_guidance_idx(idx, guidance_idx, vocab_size):
    if not isinstance(guidance_idx, torch.Tensor) or guidance_idx.shape != idx.shape \
            or guidance_idx.dtype != torch.long:
        raise ValueError(f"guidance needs guidance_idx: a LongTensor of idx's shape {tuple(idx.shape)}, each row "
                         f"the prompt under the second conditioning")
    if int(guidance_idx.min()) < 0 or int(guidance_idx.max()) >= vocab_size:
        raise ValueError(f"guidance_idx holds token ids outside [0, {vocab_size})")


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


GUIDE_AGAINST = ("opposite", "none")
OPPOSITE = {"pos": "neg", "neg": "pos"}


def guidance_rows(tokenizer, layout, sentiments, start_ids: list, guide_against: str) -> list:
    """Guidance's second prompts: each row under the opposite sentiment, or under none (<pad> where the
    sentiment token goes: what a model trained with --sentiment_dropout learned as no sentiment)."""
    if guide_against not in GUIDE_AGAINST:
        raise ValueError(f"guide_against must be one of {GUIDE_AGAINST}, got {guide_against!r}")
    if guide_against == "none":
        return [[tokenizer.token_id(layout.context_token), tokenizer.token_id(PAD)] + start_ids for _ in sentiments]
    return [prompt_row(tokenizer, layout, OPPOSITE[s], start_ids) for s in sentiments]


def stop_end(text: str, stops, after: int):
    """Where text should end for the first stop string that ends past `after` (the prompt), or None."""
    ends = [i + len(stop) for stop in stops for i in [text.find(stop, max(0, after - len(stop) + 1))] if i >= 0]
    return min(ends) if ends else None


# The sample CLI's (and the server's) defaults, which `evaluate` measures too: chosen by measurement on
# the 10-minute speedrun model (README, "Sentiment control"); the library functions keep the controls off.
DEFAULT_CONTROLS = LogitControls(guidance=8.0, no_repeat_ngram_size=2, guidance_tokens=8, guidance_after=1.5)
SAMPLING_DEFAULTS = dict(temperature=1.25, top_p=0.98, **dataclasses.asdict(DEFAULT_CONTROLS))


def add_sampling_flags(p):
    """The flags of write_samples' sampling settings, shared by the sample and evaluate CLIs."""
    p.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS["temperature"], help="0: greedy")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest tokens (0/None: all)")
    p.add_argument("--top_p", type=float, default=SAMPLING_DEFAULTS["top_p"], help="nucleus sampling mass in (0, 1]")
    p.add_argument("--guidance", type=float, default=SAMPLING_DEFAULTS["guidance"],
                   help="classifier-free guidance toward the asked sentiment: >1 pushes away from --guide_against "
                        "(1: off)")
    p.add_argument("--guidance_tokens", type=int, default=SAMPLING_DEFAULTS["guidance_tokens"],
                   help="--guidance scales a sample's first N new tokens, where its sentiment is set, and "
                        "--guidance_after the rest (0: --guidance scales every token)")
    p.add_argument("--guidance_after", type=float, default=SAMPLING_DEFAULTS["guidance_after"],
                   help="the guidance scale after the first --guidance_tokens new tokens (1: off)")
    p.add_argument("--guide_against", choices=GUIDE_AGAINST, default="opposite",
                   help="guidance's second conditioning: the opposite sentiment, or none (models trained with "
                        "--sentiment_dropout)")
    p.add_argument("--repetition_penalty", type=float, default=SAMPLING_DEFAULTS["repetition_penalty"],
                   help="divide (multiply, if negative) the logits of tokens already in the sample (1: off)")
    p.add_argument("--no_repeat_ngram_size", type=int, default=SAMPLING_DEFAULTS["no_repeat_ngram_size"],
                   help="never repeat an n-gram of this size (0: off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample where this text first appears, keeping it (repeatable)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="fp32",
                   help="the format the compiled CPU sampler holds the weight matrices in: fp32 (exact), "
                        "bf16, int8 (per-row scales); activations stay fp32")


def sampling_options(args) -> dict:
    """write_samples' keyword arguments from the flags of add_sampling_flags."""
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                controls=LogitControls(args.guidance, args.repetition_penalty, args.no_repeat_ngram_size,
                                       args.guidance_tokens, args.guidance_after),
                guide_against=args.guide_against, stop=tuple(args.stop), weights=args.weights)


def write_samples(model, tokenizer, layout, start: str, sentiment: str, num_samples: int, max_new_tokens: int,
                  temperature=0.8, top_k=None, top_p=None, seed=None, sampler="auto", on_text=None, *,
                  controls=LogitControls(), guide_against="opposite", stop=(), weights="fp32"):
    """Returns [(sentiment, text)] for num_samples reviews of `layout` (mingpt.layouts) that begin with `start`.

    controls: guidance (against the opposite sentiment or none, guide_against), repetition penalty,
    no-repeat n-grams (mingpt.logit_controls). stop: strings that end a sample where they first appear
    (the text keeps the stop string, as Hugging Face's stop_strings do).
    on_text(row, piece, sentiment), if given, receives each sample's text as it is written, in whole
    characters: first `start`, then each new piece, then None when the sample ends; a row's pieces add
    up to its returned text.
    """
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sentiments, prompts = review_prompts(model, tokenizer, layout, start, sentiment, num_samples, generator)
    guidance_idx = None
    if controls.guided:
        guidance_idx = torch.tensor(guidance_rows(tokenizer, layout, sentiments, prompts[0][2:], guide_against),
                                    dtype=torch.long, device=model.device)
    eos_id = tokenizer.token_id(layout.end_token)
    idx = torch.tensor(prompts, dtype=torch.long, device=model.device)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed, sampler=sampler,
                   weights=weights, guidance_idx=guidance_idx, **dataclasses.asdict(controls))
    if on_text is None and not stop:  # no Python between the compiled sampler's steps
        out = generate(model, idx, max_new_tokens, **options)
        start_length, texts = len(prompts[0]) - 2, []
        for row in out[:, 2:].tolist():  # the start's tokens and the new ones, up to the end token
            texts.append(tokenizer.decode(row[:row.index(eos_id, start_length)] if eos_id in row[start_length:]
                                          else row))
        return list(zip(sentiments, texts))
    collector = TextCollector(tokenizer, start, sentiments, eos_id, stop, on_text)
    generate(model, idx, max_new_tokens, callback=collector.feed, **options)
    return list(zip(sentiments, collector.texts))


class TextCollector:
    """write_samples' per-step callback: each row's text in whole characters, ended at its end token or
    first stop string (kept), streamed to on_text(row, piece, sentiment) and None at its end."""

    def __init__(self, tokenizer, start: str, sentiments, eos_id: int, stop, on_text=None):
        self.start, self.sentiments, self.eos_id, self.stop, self.on_text = start, sentiments, eos_id, stop, on_text
        self.texts, self.ended = [start] * len(sentiments), [False] * len(sentiments)
        self.decoders = [IncrementalDecoder(tokenizer) for _ in sentiments]
        for row in range(len(sentiments)):
            self.emit(row, start)

    def emit(self, row: int, piece):
        if self.on_text is not None:
            self.on_text(row, piece, self.sentiments[row])

    def feed(self, column) -> list:
        for row, token in enumerate(column):
            if self.ended[row]:
                continue
            text = self.texts[row] + ("" if token == self.eos_id else self.decoders[row].feed(token))
            end = stop_end(text, self.stop, len(self.start)) if self.stop else None
            piece = text[len(self.texts[row]):end]
            self.texts[row] += piece
            self.ended[row] = token == self.eos_id or end is not None
            if piece:
                self.emit(row, piece)
            if self.ended[row]:
                self.emit(row, None)
        return [row for row, ended in enumerate(self.ended) if ended]
