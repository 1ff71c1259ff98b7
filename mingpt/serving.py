"""The serving engine behind `python -m mingpt.serve`: requests queue up, and one worker thread, the
only one that touches the model, takes them in batches through `sampling.generate` with a per-step
callback that fans each new column of tokens out to the requests' streams.

- A request asks for one or more samples (choices: each prompt times n). Samples whose prompts have
  the same length and whose sampling settings are equal share a batch (a seeded request batches only
  with itself, so that its seed reproduces its samples); up to `max_batch` rows a batch.
- Text leaves in whole characters (`sampling.IncrementalDecoder`), with stop strings held back until
  they can no longer match.
- The queue is bounded (`max_queue` waiting samples): `submit` raises QueueFull beyond it.
- A sample that has ended (end token, stop string, max_tokens, or its client went away) leaves its
  batch at that step: the callback retires its row, which is no longer computed.
"""
import collections
import dataclasses
import itertools
import threading
import time
from typing import Callable, Optional

import torch

from .logit_controls import LogitControls
from .sampling import (DEFAULT_CONTROLS, SAMPLING_DEFAULTS, IncrementalDecoder, check_prompt_fits, draw_sentiments,
                       generate, guidance_rows, prompt_row, resolve_sampler)

SENTIMENTS = ("pos", "neg", "auto")


class QueueFull(RuntimeError):
    """The engine's queue has no room for the request; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(RuntimeError):
    """The engine is shut down."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What must be equal for samples to share a generate call."""
    temperature: float = SAMPLING_DEFAULTS["temperature"]
    top_k: Optional[int] = None
    top_p: Optional[float] = SAMPLING_DEFAULTS["top_p"]
    seed: Optional[int] = None
    controls: LogitControls = DEFAULT_CONTROLS
    guide_against: str = "opposite"


@dataclasses.dataclass
class Event:
    """What a request's sink receives: a piece of a sample's text, and at its end a finish_reason
    (stop: end token or stop string; length: max_tokens; cancelled; error) with its token count."""
    index: int
    text: str = ""
    sentiment: Optional[str] = None
    finish_reason: Optional[str] = None
    tokens: int = 0
    error: Optional[str] = None


class StopMatcher:
    """A sample's text with stop strings cut: feed(piece) returns what may be sent now and whether a
    stop string ended the text; a suffix that may still grow into a stop string is held back."""

    def __init__(self, stops):
        self.stops, self.text, self.sent = [s for s in stops if s], "", 0

    def _take(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def feed(self, piece: str):
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return self._take(min(hits)), True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._take(len(self.text) - hold), False

    def flush(self) -> str:
        return self._take(len(self.text))


class Choice:
    """One sample of a request, as the worker sees it."""

    def __init__(self, request, index: int, start_ids: list, sentiment: str):
        self.request, self.index, self.start_ids, self.sentiment = request, index, start_ids, sentiment
        self.prompt_ids, self.guidance_ids, self.decoder, self.tokens, self.finish_reason = None, None, None, 0, None
        self.matcher = StopMatcher(request.stop)
        seeded = request.settings.seed is not None
        self.key = (len(start_ids), request.settings, request.id if seeded else None)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def emit(self, text: str = "", finish_reason=None, error=None):
        self.finish_reason = self.finish_reason or finish_reason
        if text or finish_reason is not None:
            self.request.sink(Event(self.index, text, self.sentiment, finish_reason, self.tokens, error))

    def step(self, token: int, eos_id: int):
        """One new token of this sample."""
        if self.request.cancelled.is_set():
            return self.emit(finish_reason="cancelled")
        if token == eos_id:
            return self.emit(self.matcher.flush(), "stop")
        self.tokens += 1
        text, stopped = self.matcher.feed(self.decoder.feed(token))
        if stopped:
            return self.emit(text, "stop")
        if self.tokens >= self.request.max_tokens:
            return self.emit(text + self.matcher.flush(), "length")
        self.emit(text)


class Request:
    """Samples for each prompt (token ids, without the context and sentiment tokens) times n; sink(Event)
    is called from the worker thread, in order for each sample."""
    _ids = itertools.count()

    def __init__(self, prompts: list, sink: Callable, n: int = 1, max_tokens: int = 100,
                 settings: Settings = Settings(), sentiment: str = "auto", stop=()):
        if sentiment not in SENTIMENTS:
            raise ValueError(f"sentiment must be one of {SENTIMENTS}, got {sentiment!r}")
        self.id, self.sink, self.max_tokens, self.settings = next(Request._ids), sink, max_tokens, settings
        self.stop = [stop] if isinstance(stop, str) else list(stop or ())
        self.cancelled = threading.Event()
        self.choices = [Choice(self, i * n + j, list(ids), sentiment) for i, ids in enumerate(prompts) for j in range(n)]

    def cancel(self):
        """Stop this request's samples at the next step (the client went away)."""
        self.cancelled.set()


class Engine:
    """The queue and the worker thread that owns the model."""

    def __init__(self, model, tokenizer, layout, sampler="auto", max_batch=32, max_queue=256,
                 batch_wait=0.005, start=True):
        self.model, self.tokenizer, self.layout = model.eval(), tokenizer, layout
        self.sampler = resolve_sampler(sampler, model)
        self.max_batch, self.max_queue, self.batch_wait = max_batch, max_queue, batch_wait
        self.context_id = tokenizer.token_id(layout.context_token)
        self.eos_id = tokenizer.token_id(layout.end_token)
        self.pending = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.stats = collections.Counter()
        self.last_batch_s = 0.0
        self.thread = threading.Thread(target=self._run, name="mingpt-serve-engine", daemon=True)
        if start:
            self.start()

    def start(self):
        self.thread.start()

    def encode(self, text: str) -> list:
        """A prompt's token ids; ValueError (UnknownCharacterError among them) if it cannot be one."""
        ids = self.tokenizer.encode(text)
        check_prompt_fits(self.model, ids, "the prompt")
        return ids

    def submit(self, request: Request):
        with self.cond:
            if self.closed:
                raise EngineStopped("the server is shutting down")
            if len(self.pending) + len(request.choices) > self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"the queue is full ({len(self.pending)} samples waiting, at most "
                                f"{self.max_queue})", retry_after=max(1, round(self.last_batch_s)))
            self.pending.extend(request.choices)
            self.stats["requests"] += 1
            self.cond.notify()

    def health(self) -> dict:
        with self.cond:
            return {"status": "stopped" if self.closed else "ok", "queued": len(self.pending),
                    "running": self.stats["running"], "sampler": self.sampler,
                    **{k: v for k, v in self.stats.items() if k != "running"}}

    def close(self):
        with self.cond:
            self.closed = True
            left, self.pending = list(self.pending), collections.deque()
            self.cond.notify_all()
        for choice in left:
            choice.emit(finish_reason="error", error="the server is shutting down")
        if self.thread.is_alive():
            self.thread.join()

    def _run(self):
        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            try:
                self._run_batch(batch)
            finally:
                with self.cond:
                    self.stats["running"] = 0
                    self.last_batch_s = time.perf_counter() - started

    def _next_batch(self):
        """The next batch: the oldest waiting sample and those that may share its generate call."""
        with self.cond:
            while not self.pending and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
        time.sleep(self.batch_wait)  # let requests arriving together share the batch
        with self.cond:
            key, batch, keep = self.pending[0].key, [], collections.deque()
            for choice in self.pending:
                if choice.request.cancelled.is_set():
                    choice.emit(finish_reason="cancelled")
                    self.stats["cancelled_samples"] += 1
                elif choice.key == key and len(batch) < self.max_batch:
                    batch.append(choice)
                else:
                    keep.append(choice)
            self.pending = keep
            self.stats.update(running=len(batch), batches=int(bool(batch)), batched_samples=len(batch))
            return batch

    def _prepare(self, batch):
        """Draw the sentiments asked as auto (a seeded request from its seed) and build each prompt row."""
        by_request = collections.defaultdict(list)
        for choice in batch:
            by_request[choice.request].append(choice)
        for request, choices in by_request.items():
            auto = [c for c in choices if c.sentiment == "auto"]
            if auto:
                seed = request.settings.seed
                generator = torch.Generator().manual_seed(seed) if seed is not None else None
                for choice, sentiment in zip(auto, draw_sentiments(
                        self.model, self.tokenizer, self.context_id, len(auto), generator)):
                    choice.sentiment = sentiment
        guide_against = batch[0].request.settings.guide_against
        for choice in batch:
            choice.prompt_ids = prompt_row(self.tokenizer, self.layout, choice.sentiment, choice.start_ids)
            choice.guidance_ids = guidance_rows(self.tokenizer, self.layout, [choice.sentiment], choice.start_ids,
                                                guide_against)[0]
            choice.decoder = IncrementalDecoder(self.tokenizer)

    def _run_batch(self, batch):
        settings = batch[0].request.settings

        def callback(column):
            running = [(choice, token) for choice, token in zip(batch, column) if not choice.done]
            for choice, token in running:
                choice.step(token, self.eos_id)
            self.stats["tokens"] += len(running)
            return [row for row, choice in enumerate(batch) if choice.done]

        try:
            self._prepare(batch)
            idx, guidance_idx = (torch.tensor([getattr(c, rows) for c in batch], dtype=torch.long,
                                              device=self.model.device) for rows in ("prompt_ids", "guidance_ids"))
            generate(self.model, idx, max(c.request.max_tokens for c in batch), temperature=settings.temperature,
                     top_k=settings.top_k, top_p=settings.top_p, eos_id=self.eos_id, seed=settings.seed,
                     sampler=self.sampler, callback=callback, guidance_idx=guidance_idx,
                     **dataclasses.asdict(settings.controls))
        except Exception as e:  # a sample that cannot be made ends with the reason; the worker goes on
            for choice in batch:
                if not choice.done:
                    choice.emit(finish_reason="error", error=f"{type(e).__name__}: {e}")
        for choice in batch:
            if not choice.done:
                choice.emit(choice.matcher.flush(), "length")
        self.stats["cancelled_samples"] += sum(c.finish_reason == "cancelled" for c in batch)
