"""Reviews from a model: the prompt rows of the review layouts (context token, sentiment token, start),
guidance's second prompts, and write_samples, which writes reviews as text."""
import torch

from ..tokenizer import PAD, SENTIMENT_TOKENS, UnknownCharacterError
from .engine import generate
from .settings import DEFAULTS, SamplingSettings
from .streaming import TextStream

OPPOSITE = {"pos": "neg", "neg": "pos"}


@torch.no_grad()
def draw_sentiments(model, tokenizer, context_id: int, n: int, generator) -> list:
    """Sentiments drawn from the model's own p(<pos>|<neg> given the context token)."""
    names = list(SENTIMENT_TOKENS)
    ids = torch.tensor([tokenizer.token_id(SENTIMENT_TOKENS[s]) for s in names])
    logits, _ = model(torch.tensor([[context_id]], device=model.device))
    probs = logits[0, -1, ids.to(model.device)].float().softmax(-1).cpu()
    return [names[i] for i in torch.multinomial(probs, n, replacement=True, generator=generator).tolist()]


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


def guidance_rows(tokenizer, layout, sentiments, start_ids: list, guide_against: str) -> list:
    """Guidance's second prompts: each row under the opposite sentiment, or under none (<pad> where the
    sentiment token goes: what a model trained with --sentiment_dropout learned as no sentiment)."""
    if guide_against == "none":
        return [[tokenizer.token_id(layout.context_token), tokenizer.token_id(PAD)] + start_ids for _ in sentiments]
    return [prompt_row(tokenizer, layout, OPPOSITE[s], start_ids) for s in sentiments]


def write_samples(model, tokenizer, layout, start: str, sentiment: str, num_samples: int, max_new_tokens: int,
                  settings: SamplingSettings = DEFAULTS, *, seed=None, sampler="auto", on_text=None):
    """Returns [(sentiment, text)] for num_samples reviews of `layout` (mingpt.data.layouts) that begin with
    `start`, drawn by `settings`; a stop string ends a sample where it first appears, and the text keeps it
    (as Hugging Face's stop_strings do).

    on_text(row, piece, sentiment), if given, receives each sample's text as it is written, in whole
    characters: first `start`, then each new piece, then None when the sample ends; a row's pieces add
    up to its returned text.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sentiments, prompts = review_prompts(model, tokenizer, layout, start, sentiment, num_samples, generator)
    guidance_idx = None
    if settings.needs_guidance_idx:
        guidance_idx = torch.tensor(guidance_rows(tokenizer, layout, sentiments, prompts[0][2:], settings.guide_against),
                                    dtype=torch.long, device=model.device)
    eos_id = tokenizer.token_id(layout.end_token)
    idx = torch.tensor(prompts, dtype=torch.long, device=model.device)
    options = dict(eos_id=eos_id, seed=seed, sampler=sampler, guidance_idx=guidance_idx)
    if on_text is None and not settings.stop:  # no Python between the compiled sampler's steps
        out = generate(model, idx, max_new_tokens, settings, **options)
        start_length, texts = len(prompts[0]) - 2, []
        for row in out[:, 2:].tolist():  # the start's tokens and the new ones, up to the end token
            texts.append(tokenizer.decode(row[:row.index(eos_id, start_length)] if eos_id in row[start_length:]
                                          else row))
        return list(zip(sentiments, texts))
    collector = TextCollector(tokenizer, start, sentiments, eos_id, settings.stop, on_text)
    generate(model, idx, max_new_tokens, settings, callback=collector.feed, **options)
    return list(zip(sentiments, collector.texts))


class TextCollector:
    """write_samples' per-step callback: each row's TextStream (stop strings kept), its text streamed to
    on_text(row, piece, sentiment), and None at its end."""

    def __init__(self, tokenizer, start: str, sentiments, eos_id: int, stops, on_text=None):
        self.sentiments, self.on_text = sentiments, on_text
        self.streams = [TextStream(tokenizer, eos_id, stops, keep_stop=True, prefix=start) for _ in sentiments]
        self.texts = [start] * len(sentiments)
        for row in range(len(sentiments)):
            self.emit(row, start)

    def emit(self, row: int, piece):
        if self.on_text is not None:
            self.on_text(row, piece, self.sentiments[row])

    def feed(self, column) -> list:
        for row, (stream, token) in enumerate(zip(self.streams, column)):
            if stream.ended:
                continue
            piece = stream.feed(token)
            self.texts[row] += piece
            if piece:
                self.emit(row, piece)
            if stream.ended:
                self.emit(row, None)
        return [row for row, stream in enumerate(self.streams) if stream.ended]
