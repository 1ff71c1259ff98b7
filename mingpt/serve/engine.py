"""The serving engine behind `python -m mingpt.serve`: requests queue up, and one worker thread, the only
one that touches the model, decodes a running batch (mingpt.serve.batch) that samples join and leave
between steps (continuous batching): a new request draws its first token at the next step, whatever
the other samples' lengths.

- A request asks for one or more samples (choices: each prompt times n), each with its own settings;
  a seeded request draws from a generator of its own, so that its seed reproduces its samples (up to
  the floating-point effects of the rows it shares a step with).
- Text leaves in whole characters through mingpt.sample.streaming.TextStream, which ends it before a
  stop string (OpenAI's rule) and holds back text that may still become one.
- The queue is bounded (`max_queue` waiting samples): `submit` raises QueueFull beyond it. A sample
  joins when the batch has rows for it (`max_rows`: candidates and guidance rows count).
- A sample ends at the end token, a stop string, max_tokens, or when its client goes away; it leaves the
  batch at that step.
- A watchdog: if the worker dies, or has not finished a step in `watchdog_s`, the engine is down:
  `health` says so, waiting samples end with a 503 error and `submit` raises EngineStopped.
"""
import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Optional

import torch

from ..sample.reviews import check_prompt_fits, draw_sentiments, guidance_rows, prompt_row
from ..sample.settings import DEFAULTS, SamplingSettings
from ..sample.streaming import TextStream
from .batch import RunningBatch
from .metrics import ServeMetrics

SENTIMENTS = ("pos", "neg", "auto")


class QueueFull(RuntimeError):
    """The engine's queue has no room for the request; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(RuntimeError):
    """The engine is shut down, or its worker is down (the message says which)."""


@dataclasses.dataclass
class Event:
    """What a request's sink receives: a piece of a sample's text (with the log-probabilities of its tokens,
    if asked), and at its end a finish_reason (stop: end token or stop string; length: max_tokens;
    cancelled; error, with its HTTP status) with its token count."""
    index: int
    text: str = ""
    sentiment: Optional[str] = None
    finish_reason: Optional[str] = None
    tokens: int = 0
    error: Optional[str] = None
    status: Optional[int] = None
    logprobs: list = dataclasses.field(default_factory=list)  # (token id, text, log-probability, {text: lp} top)


class Choice:
    """One sample of a request, as the worker sees it."""

    def __init__(self, request, index: int, start_ids: list, sentiment: str):
        self.request, self.index, self.start_ids, self.sentiment = request, index, start_ids, sentiment
        self.prompt_ids, self.guidance_ids, self.stream, self.tokens, self.finish_reason = None, None, None, 0, None
        self.last_token_at, self.first_text_sent = None, False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def emit(self, text: str = "", finish_reason=None, error=None, status=None, logprobs=()):
        if self.done:
            return
        self.finish_reason = finish_reason
        metrics = self.request.metrics
        if text and not self.first_text_sent:
            self.first_text_sent = True
            metrics.time_to_first_token.observe(time.perf_counter() - self.request.arrived)
        if finish_reason is not None:
            self.request.ended[finish_reason] += 1
            metrics.samples.labels(finish_reason).inc()
            if error is not None:
                metrics.errors.labels("sample_error").inc()
        if text or finish_reason is not None or logprobs:
            self.request.sink(Event(self.index, text, self.sentiment, finish_reason, self.tokens, error, status,
                                    list(logprobs)))

    def step(self, token: int, logprob=None):
        """One new token of this sample (and its log-probabilities, when the request asks for them)."""
        if self.request.cancelled.is_set():
            return self.emit(finish_reason="cancelled")
        now = time.perf_counter()
        if self.last_token_at is not None:
            self.request.metrics.inter_token_latency.observe(now - self.last_token_at)
        self.last_token_at = now
        counted = token != self.stream.eos_id
        self.tokens += counted
        self.request.metrics.completion_tokens.inc(counted)
        logprobs = [logprob] if logprob is not None and counted else []
        text = self.stream.feed(token)
        if self.stream.ended:
            return self.emit(text, "stop", logprobs=logprobs)
        if self.tokens >= self.request.max_tokens:
            return self.emit(text + self.stream.flush(), "length", logprobs=logprobs)
        self.emit(text, logprobs=logprobs)

    def finish(self):
        """The sample ends at max_tokens without an end token."""
        self.emit(self.stream.flush() if self.stream else "", "length")


class Request:
    """Samples for each prompt (token ids, without the context and sentiment tokens) times n; sink(Event)
    is called from the worker thread, in order for each sample. logprobs: how many alternatives to report
    beside each token's log-probability (None: none)."""
    _ids = itertools.count()

    def __init__(self, prompts: list, sink: Callable, n: int = 1, max_tokens: int = 100,
                 settings: SamplingSettings = DEFAULTS, sentiment: str = "auto", seed: Optional[int] = None,
                 logprobs: Optional[int] = None):
        if sentiment not in SENTIMENTS:
            raise ValueError(f"sentiment must be one of {SENTIMENTS}, got {sentiment!r}")
        self.id, self.sink, self.max_tokens, self.settings = next(Request._ids), sink, max_tokens, settings
        self.seed, self.logprobs = seed, logprobs
        self.metrics, self.ended = None, None  # the engine's, once submitted
        self.cancelled = threading.Event()
        self.arrived = time.perf_counter()
        self.generator, self.prepared, self.batch_key = None, False, None  # set as its first sample joins
        self.choices = [Choice(self, i * n + j, list(ids), sentiment) for i, ids in enumerate(prompts) for j in range(n)]

    def cancel(self):
        """Stop this request's samples at the next step (the client went away)."""
        self.cancelled.set()


class Engine:
    """The queue, the worker thread that owns the model, and its watchdog."""

    def __init__(self, model, tokenizer, layout, max_rows=128, max_queue=256, watchdog_s=30.0,
                 metrics: Optional[ServeMetrics] = None, start=True, decoder="auto"):
        self.model, self.tokenizer, self.layout = model.eval(), tokenizer, layout
        self.max_rows, self.max_queue, self.watchdog_s = max_rows, max_queue, watchdog_s
        self.context_id = tokenizer.token_id(layout.context_token)
        self.eos_id = tokenizer.token_id(layout.end_token)
        self.metrics = metrics or ServeMetrics()
        self.batch = RunningBatch(model, tokenizer, self.eos_id, max_rows, decoder)
        self.pending = collections.deque()
        self.cond = threading.Condition()
        self.closed, self.ready, self.crash = False, False, None
        self.beat = time.monotonic()  # the worker's last sign of life: a step done, or waiting idle
        self.stats, self.ended = collections.Counter(), collections.Counter()  # ended: samples by finish reason
        self.metrics.queue_depth.set_function(lambda: len(self.pending))
        self.metrics.running_samples.set_function(lambda: len(self.batch.draws))
        self.metrics.batch_rows.set_function(lambda: self.batch.rows)
        self.metrics.engine_up.set_function(lambda: float(self.down_reason() is None and self.ready))
        self.thread = threading.Thread(target=self._run, name="mingpt-serve-engine", daemon=True)
        self.watchdog = threading.Thread(target=self._watch, name="mingpt-serve-watchdog", daemon=True)
        if start:
            self.start()

    def start(self):
        self.thread.start()
        self.watchdog.start()

    def encode(self, text: str) -> list:
        """A prompt's token ids; ValueError (UnknownCharacterError among them) if it cannot be one."""
        ids = self.tokenizer.encode(text)
        check_prompt_fits(self.model, ids, "the prompt")
        return ids

    def down_reason(self) -> Optional[str]:
        """Why the engine cannot serve (its worker ended, or is stuck), or None."""
        if self.crash is not None:
            return self.crash
        if self.thread.ident is not None and not self.thread.is_alive() and not self.closed:
            return "the engine's worker has stopped"
        stalled = time.monotonic() - self.beat
        if (self.pending or self.batch.draws) and stalled > self.watchdog_s:
            return f"the engine's worker has not finished a step in {stalled:.0f} s"
        return None

    def submit(self, request: Request):
        """Queue a request's samples; ValueError if one cannot fit the batch, QueueFull, EngineStopped."""
        needed = max(RunningBatch.rows_needed(choice) for choice in request.choices)
        if needed > self.max_rows:
            raise ValueError(f"a sample of this request needs {needed} rows of the batch (its candidates, each "
                             f"with a second-conditioning row if guided or one of several); this server runs at "
                             f"most {self.max_rows}")
        with self.cond:
            if self.closed:
                raise EngineStopped("the server is shutting down")
            if (reason := self.down_reason()) is not None:
                raise EngineStopped(reason)
            if len(self.pending) + len(request.choices) > self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"the queue is full ({len(self.pending)} samples waiting, at most "
                                f"{self.max_queue})", retry_after=max(1, round(len(self.pending) / 10)))
            request.metrics, request.ended = self.metrics, self.ended
            self.pending.extend(request.choices)
            self.stats["requests"] += 1
            self.cond.notify()

    def health(self) -> dict:
        reason = self.down_reason()
        status = "stopped" if self.closed else "down" if reason else "ok" if self.ready else "loading"
        return {"status": status, **({"reason": reason} if reason else {}), "queued": len(self.pending),
                "running": len(self.batch.draws), "rows": self.batch.rows, "max_rows": self.max_rows,
                "cancelled_samples": self.ended["cancelled"], **self.stats}

    def close(self, timeout: float = 10.0):
        """Stop: waiting and running samples end with an error (503), and the worker leaves at its next step."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self._fail_pending("the server is shutting down")
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _fail_pending(self, reason: str):
        with self.cond:
            left, self.pending = list(self.pending), collections.deque()
        for choice in left:
            choice.emit(finish_reason="error", error=reason, status=503)

    def _watch(self):
        """Fail the waiting samples while the worker is down or stuck, so that no client waits forever."""
        while not self.closed:
            reason = self.down_reason()
            if reason is not None:
                self._fail_pending(reason)
            time.sleep(min(1.0, self.watchdog_s / 4))

    def _run(self):
        try:
            with torch.no_grad():
                self.model(torch.tensor([[self.context_id]], device=self.model.device))  # loaded and runnable
                self.ready = True
                while self._admit():
                    started = time.perf_counter()
                    self._step()
                    self.metrics.decode_step.observe(time.perf_counter() - started)
                    self.beat = time.monotonic()
        except BaseException as e:  # the worker is gone: say why to everyone waiting on it, and in the log
            self.crash = f"the engine's worker stopped: {type(e).__name__}: {e}"
            logging.getLogger("mingpt.serve").exception(self.crash)
        finally:
            reason = self.crash or "the server is shutting down"
            self._fail_pending(reason)
            self.batch.fail_all(reason, 503)

    def _step(self):
        try:
            self.stats["steps"] += 1
            self.batch.step()
        except Exception as e:  # a step that fails ends its samples with the reason; the worker goes on
            self.batch.fail_all(f"{type(e).__name__}: {e}", 500)

    def _admit(self) -> bool:
        """Wait for work; move waiting samples into the batch while it has rows for them. False: closed."""
        with self.cond:
            while not self.pending and not self.batch.draws and not self.closed:
                self.cond.wait(1.0)
                self.beat = time.monotonic()
            if self.closed:
                return False
            joining = []
            while self.pending and self.batch.rows_in_use + sum(map(RunningBatch.rows_needed, joining)) \
                    + RunningBatch.rows_needed(self.pending[0]) <= self.max_rows:
                joining.append(self.pending.popleft())
        for choice in joining:
            if choice.request.cancelled.is_set():
                choice.emit(finish_reason="cancelled")
                continue
            self._prepare(choice)
            self.batch.admit(choice)
        return True

    def _prepare(self, choice):
        """A choice's prompt rows and stream; its request's auto sentiments are drawn on its first choice's turn
        (a seeded request's from its seed, which also seeds its own generator of tokens)."""
        request = choice.request
        if not request.prepared:
            request.prepared = True
            sentiment_generator = None
            if request.seed is not None:
                sentiment_generator = torch.Generator().manual_seed(request.seed)
                request.generator = torch.Generator(device=self.model.device).manual_seed(request.seed)
            auto = [c for c in request.choices if c.sentiment == "auto"]
            if auto:
                for c, sentiment in zip(auto, draw_sentiments(self.model, self.tokenizer, self.context_id, len(auto),
                                                              sentiment_generator)):
                    c.sentiment = sentiment
        settings = request.settings
        choice.prompt_ids = prompt_row(self.tokenizer, self.layout, choice.sentiment, choice.start_ids)
        choice.guidance_ids = guidance_rows(self.tokenizer, self.layout, [choice.sentiment], choice.start_ids,
                                            settings.guide_against)[0]
        choice.stream = TextStream(self.tokenizer, self.eos_id, settings.stop, keep_stop=False)
