"""The serving engine behind `python -m mingpt.serve`: requests queue up, and one worker thread, the
only one that touches the model, takes them in batches through `sampling.generate` with a per-step
callback that fans each new column of tokens out to the requests' streams.

- A request asks for one or more samples (choices: each prompt times n). Samples whose prompts have
  the same length and whose SamplingSettings are equal share a batch (a seeded request batches only
  with itself, so that its seed reproduces its samples); up to `max_batch` rows a batch.
- Text leaves in whole characters through mingpt.sample.streaming.TextStream, which ends it before a
  stop string (OpenAI's rule) and holds back text that may still become one.
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

from ..sample.engine import generate, resolve_sampler
from ..sample.reviews import check_prompt_fits, draw_sentiments, guidance_rows, prompt_row
from ..sample.settings import DEFAULTS, SamplingSettings
from ..sample.streaming import TextStream

SENTIMENTS = ("pos", "neg", "auto")


class QueueFull(RuntimeError):
    """The engine's queue has no room for the request; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(RuntimeError):
    """The engine is shut down."""


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


class Choice:
    """One sample of a request, as the worker sees it."""

    def __init__(self, request, index: int, start_ids: list, sentiment: str):
        self.request, self.index, self.start_ids, self.sentiment = request, index, start_ids, sentiment
        self.prompt_ids, self.guidance_ids, self.stream, self.tokens, self.finish_reason = None, None, None, 0, None
        seeded = request.seed is not None  # stop strings are each sample's own: they do not part batches
        self.key = (len(start_ids), request.settings.replace(stop=()), request.id if seeded else None)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def emit(self, text: str = "", finish_reason=None, error=None):
        self.finish_reason = self.finish_reason or finish_reason
        if text or finish_reason is not None:
            self.request.sink(Event(self.index, text, self.sentiment, finish_reason, self.tokens, error))

    def step(self, token: int):
        """One new token of this sample."""
        if self.request.cancelled.is_set():
            return self.emit(finish_reason="cancelled")
        self.tokens += token != self.stream.eos_id
        text = self.stream.feed(token)
        if self.stream.ended:
            return self.emit(text, "stop")
        if self.tokens >= self.request.max_tokens:
            return self.emit(text + self.stream.flush(), "length")
        self.emit(text)


class Request:
    """Samples for each prompt (token ids, without the context and sentiment tokens) times n; sink(Event)
    is called from the worker thread, in order for each sample."""
    _ids = itertools.count()

    def __init__(self, prompts: list, sink: Callable, n: int = 1, max_tokens: int = 100,
                 settings: SamplingSettings = DEFAULTS, sentiment: str = "auto", seed: Optional[int] = None):
        if sentiment not in SENTIMENTS:
            raise ValueError(f"sentiment must be one of {SENTIMENTS}, got {sentiment!r}")
        self.id, self.sink, self.max_tokens, self.settings = next(Request._ids), sink, max_tokens, settings
        self.seed = seed
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
                seed = request.seed
                generator = torch.Generator().manual_seed(seed) if seed is not None else None
                for choice, sentiment in zip(auto, draw_sentiments(
                        self.model, self.tokenizer, self.context_id, len(auto), generator)):
                    choice.sentiment = sentiment
        settings = batch[0].request.settings
        for choice in batch:
            choice.prompt_ids = prompt_row(self.tokenizer, self.layout, choice.sentiment, choice.start_ids)
            choice.guidance_ids = guidance_rows(self.tokenizer, self.layout, [choice.sentiment], choice.start_ids,
                                                settings.guide_against)[0]
            choice.stream = TextStream(self.tokenizer, self.eos_id, choice.request.settings.stop, keep_stop=False)

    def _run_batch(self, batch):
        request = batch[0].request

        def callback(column):
            running = [(choice, token) for choice, token in zip(batch, column) if not choice.done]
            for choice, token in running:
                choice.step(token)
            self.stats["tokens"] += len(running)
            return [row for row, choice in enumerate(batch) if choice.done]

        try:
            self._prepare(batch)
            idx, guidance_idx = (torch.tensor([getattr(c, rows) for c in batch], dtype=torch.long,
                                              device=self.model.device) for rows in ("prompt_ids", "guidance_ids"))
            generate(self.model, idx, max(c.request.max_tokens for c in batch), request.settings, eos_id=self.eos_id,
                     seed=request.seed, sampler=self.sampler, callback=callback, guidance_idx=guidance_idx)
        except Exception as e:  # a sample that cannot be made ends with the reason; the worker goes on
            for choice in batch:
                if not choice.done:
                    choice.emit(finish_reason="error", error=f"{type(e).__name__}: {e}")
        for choice in batch:
            if not choice.done:
                choice.emit(choice.stream.flush() if choice.stream else "", "length")
        self.stats["cancelled_samples"] += sum(c.finish_reason == "cancelled" for c in batch)
