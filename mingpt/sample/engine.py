"""The decode engine: `generate` and the samplers it picks from.

  reference  nanoGPT's loop: re-run the whole (cropped) context for every new token
  kvcache    eager PyTorch with a KV cache: the honest neighbour of `cached` in benchmarks
  cached     mingpt._C's KV-cached sampler: on the CPU every step of every sample runs in
             compiled code (mingpt.sample.compiled); on CUDA, the kvcache loop, whose fused op table
             brings the extension's cache-append and single-query attention kernels
  auto       cached where it can run for the model, else reference

Every sampler draws by the same SamplingSettings (mingpt.sample.settings). Context policy, shared by
every sampler: the model sees at most the last `block_size` tokens; past the block, each step re-reads
that sliding window. Cached keys cannot serve there (every token's position changes when the window
slides), so the cached samplers re-prefill the cache from the last window at each such step: the
reference's logits at the reference's cost.
"""
import queue
import threading
import warnings

import torch

from .candidates import best_rows, conditioning_margin
from .compiled import cached_generate, cached_sampler_unavailable_reason
from .controls import apply_controls
from .settings import DEFAULTS, SamplingSettings

SAMPLERS = ("auto", "reference", "kvcache", "cached")


def check_sampling_args(model, idx, max_new_tokens, settings: SamplingSettings, eos_id=None, guidance_idx=None):
    """What generate refuses, by name: settings are checked when made, the rest against the model here."""
    if not isinstance(settings, SamplingSettings):
        raise TypeError(f"settings must be a SamplingSettings, got {type(settings).__name__}")
    vocab_size = model.config.vocab_size
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        raise ValueError("idx must be a LongTensor of shape (batch, prompt_length)")
    if idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"idx must hold at least one prompt of at least one token, got shape {tuple(idx.shape)}")
    if int(idx.min()) < 0 or int(idx.max()) >= vocab_size:
        raise ValueError(f"idx holds token ids outside [0, {vocab_size})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id must be a token id in [0, {vocab_size}), got {eos_id}")
    if settings.no_repeat_ngram_size > model.config.block_size:
        raise ValueError(f"no_repeat_ngram_size {settings.no_repeat_ngram_size} is longer than the model's block "
                         f"of {model.config.block_size}")
    if settings.needs_guidance_idx:
        check_guidance_idx(idx, guidance_idx, vocab_size, settings)


# top-p first looks among each row's 1,024 likeliest tokens (a review model's nucleus at the defaults: median 240, 99th
# percentile 1,044 of 4,649 characters): a top-k of them costs a third of sorting the whole row.
TOP_P_CANDIDATES = 1024


def next_token_probs(logits, temperature, top_k=None, top_p=None, min_p=0.0):
    """Probabilities over the vocabulary after temperature, top-k, top-p (nucleus) and min-p filtering (min-p:
    a token below min_p times the likeliest token's probability is cut, as Hugging Face's MinPLogitsWarper)."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = logits.masked_fill(~nucleus(logits, top_p), float("-inf"))
    probs = logits.softmax(dim=-1)
    if min_p:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def nucleus(logits, top_p: float):
    """Where each row keeps its smallest set of likeliest tokens whose mass reaches top_p: a token is dropped if
    the mass before it does. Rows whose TOP_P_CANDIDATES likeliest tokens reach top_p are decided among them;
    the others among their whole row."""
    keep, decided = _nucleus_among(logits, top_p, min(TOP_P_CANDIDATES, logits.size(-1)))
    if not decided.all():
        keep[~decided] = _nucleus_among(logits[~decided], top_p, logits.size(-1))[0]
    return keep


def _nucleus_among(logits, top_p: float, candidates: int):
    """nucleus among each row's `candidates` likeliest tokens, and whether their mass reaches top_p."""
    values, order = logits.topk(candidates, dim=-1)
    probs = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, (probs.cumsum(dim=-1) - probs) < top_p)
    return keep, probs.sum(dim=-1) >= top_p


def pick_next(logits, settings: SamplingSettings, generator):
    """A token a row of logits under `settings`: greedy at temperature 0, else a draw from next_token_probs (by
    inverse CDF: one uniform number a row, where torch.multinomial walks the vocabulary more slowly)."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = next_token_probs(logits, settings.temperature, settings.top_k, settings.top_p, settings.min_p)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)


def _decode_loop(next_logits, idx, max_new_tokens, settings: SamplingSettings, eos_id, generator, callback,
                 guidance_idx=None):
    """The loop every Python sampler shares. next_logits(seq, kept) gives the next-token logits of the
    running rows `seq` (kept: which rows of the previous call's seq still run, None if all do); rows
    that end (eos_id, or retired by the callback) are padded with eos_id and no longer computed.
    Guided, the rows of guidance_idx run beside those of idx (after them) and take the same tokens."""
    batch = idx.shape[0]
    seq = idx if not settings.guided else torch.cat([idx, guidance_idx])
    running = torch.arange(batch, device=idx.device)
    kept, previously_running = None, batch  # which rows of the last step still run, of how many
    for step in range(max_new_tokens):
        rows, model_kept = running, kept
        if settings.guided:  # the guidance rows follow the running rows, in the same order
            rows = torch.cat([running, running + batch])
            model_kept = None if kept is None else torch.cat([kept, kept + previously_running])
        logits = apply_controls(next_logits(seq[rows], model_kept), seq[running], settings, step)
        picked = pick_next(logits, settings, generator).squeeze(1)
        column = torch.full_like(idx[:, 0], -1 if eos_id is None else eos_id).index_copy(0, running, picked)
        seq = torch.cat([seq, column.repeat(2 if settings.guided else 1).unsqueeze(1)], dim=1)
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
def reference_generate(model, idx, max_new_tokens, settings: SamplingSettings = DEFAULTS, eos_id=None, generator=None,
                       callback=None, guidance_idx=None):
    """The plain loop: re-run the whole (cropped) context for every new token."""
    block_size = model.config.block_size
    return _decode_loop(lambda seq, kept: model(seq[:, -block_size:])[0][:, -1, :], idx, max_new_tokens,
                        settings, eos_id, generator, callback, guidance_idx)


@torch.no_grad()
def kvcache_generate(model, idx, max_new_tokens, settings: SamplingSettings = DEFAULTS, eos_id=None, generator=None,
                     callback=None, guidance_idx=None):
    """The model's own forward with a KV cache: prefill the (cropped) prompt, then one position per step."""
    block = model.config.block_size
    cache = model.new_cache(idx.shape[0] * (2 if settings.guided else 1))
    prompt_length = idx.shape[1]

    def next_logits(seq, kept):
        if kept is not None:
            cache.keep_rows(kept)
        length = seq.shape[1]
        if length == prompt_length or length > block:  # the prompt, or a slid window: prefill
            return model(seq[:, -block:], cache=cache)[0][:, -1]
        return model(seq[:, -1:], cache=cache, start=length - 1)[0][:, -1]

    return _decode_loop(next_logits, idx, max_new_tokens, settings, eos_id, generator, callback, guidance_idx)



def resolve_sampler(sampler: str, model=None) -> str:
    """The sampler that `sampler` names here: auto is cached where it can run, else reference."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler != "auto":
        return sampler
    reason = cached_sampler_unavailable_reason(model)
    if reason is None:
        return "cached"
    if model is None or cached_sampler_unavailable_reason() is not None:  # the build, not the model
        warnings.warn(f"sampling with the reference loop: {reason}", RuntimeWarning, stacklevel=2)
    return "reference"


def generate(model, idx, max_new_tokens, settings: SamplingSettings = DEFAULTS, *, eos_id=None, seed=None,
             sampler="auto", callback=None, guidance_idx=None):
    """Continue each prompt row of idx by `settings`; rows that emit eos_id are padded with it afterwards.

    callback, if given, receives each new column of tokens as a list (one id per row; rows that have
    ended show eos_id); it may return row indices to stop after that column (a client went away):
    they are padded with eos_id like rows that emitted it, and no longer computed.
    Guided settings (the defaults are) need guidance_idx: each row's prompt under the second
    conditioning, idx's shape (mingpt.sample.reviews builds it for reviews); so do settings.candidates > 1
    (mingpt.sample.candidates), which hand the callback its columns once each row's draw is chosen. Stop
    strings are text:
    write_samples applies them. bf16 and int8 weights run in the compiled CPU sampler only.
    """
    check_sampling_args(model, idx, max_new_tokens, settings, eos_id, guidance_idx)
    if settings.candidates > 1:
        return best_of_candidates(model, idx, max_new_tokens, settings, eos_id=eos_id, seed=seed, sampler=sampler,
                                  callback=callback, guidance_idx=guidance_idx)
    name = resolve_sampler(sampler, model)
    if name == "cached":
        reason = cached_sampler_unavailable_reason(model)
        if reason is not None:
            raise RuntimeError(f"sampler 'cached' is not available: {reason}")
        if idx.device.type == "cpu":
            return cached_generate(model, idx, max_new_tokens, settings, eos_id, seed, callback, guidance_idx)
    if settings.weights != "fp32":
        raise ValueError(f"{settings.weights} weights run in the compiled CPU sampler only, not in the {name} "
                         f"sampler on {idx.device.type}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    loops = {"reference": reference_generate, "kvcache": kvcache_generate, "cached": kvcache_generate}
    was_training = model.training
    model.eval()
    try:
        return loops[name](model, idx, max_new_tokens, settings, eos_id, generator, callback, guidance_idx)
    finally:
        model.train(was_training)


def best_of_candidates(model, idx, max_new_tokens, settings: SamplingSettings, *, eos_id, callback, guidance_idx,
                       **options):
    """generate at settings.candidates draws of each row, keeping each row's draw with the largest
    conditioning margin; a callback then receives the kept rows' columns one by one."""
    n = settings.candidates
    second_prompts = guidance_idx.repeat_interleave(n, 0)
    drawn = generate(model, idx.repeat_interleave(n, 0), max_new_tokens, settings.replace(candidates=1),
                     eos_id=eos_id, guidance_idx=second_prompts, **options)
    kept = drawn[best_rows(conditioning_margin(model, drawn, second_prompts, eos_id), n)]
    if callback is None:
        return kept
    ended = torch.zeros(kept.shape[0], dtype=torch.bool, device=kept.device)
    for step in range(idx.shape[1], kept.shape[1]):
        retired = check_retired_rows(callback(kept[:, step].tolist()), kept.shape[0], eos_id)
        kept[retired, step + 1:] = -1 if eos_id is None else eos_id
        ended[retired] = True
        if eos_id is not None:
            ended |= kept[:, step] == eos_id
        if bool(ended.all()):
            return kept[:, :step + 1]
    return kept


def check_guidance_idx(idx, guidance_idx, vocab_size, settings: SamplingSettings):
    if not isinstance(guidance_idx, torch.Tensor) or guidance_idx.shape != idx.shape \
            or guidance_idx.dtype != torch.long:
        raise ValueError(f"guidance {settings.guidance:g} needs guidance_idx: a LongTensor of idx's shape "
                         f"{tuple(idx.shape)}, each row the prompt under the second conditioning (or settings "
                         f"without guidance: SamplingSettings.plain(), or guidance=1 and guidance_after=1)")
    if int(guidance_idx.min()) < 0 or int(guidance_idx.max()) >= vocab_size:
        raise ValueError(f"guidance_idx holds token ids outside [0, {vocab_size})")


class StopGeneration(Exception):
    """Raised by a `generate` callback to end the generation after the column it was given."""


_DONE = object()


def generate_stream(model, idx, max_new_tokens, settings: SamplingSettings = DEFAULTS, **options):
    """`generate` as an iterator over its new columns (one token id per row, each step as it is made);
    closing the iterator early stops the generation at its next step. Options are generate's."""
    columns, stop = queue.Queue(), threading.Event()

    def callback(column):
        if stop.is_set():
            raise StopGeneration
        columns.put(column)

    def run():
        try:
            generate(model, idx, max_new_tokens, settings, callback=callback, **options)
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
