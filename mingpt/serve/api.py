"""The HTTP face of the serving engine (FastAPI): an OpenAI-compatible `POST /v1/completions` (with
server-sent events and logprobs), `GET /v1/models`, `POST /tokenize`, `POST /detokenize`, `GET /health`,
`GET /metrics` (Prometheus), `GET /v1/model_card` and the web playground at `/`.

Every bad request is a 400 (401 without the API key, 408 for a body that does not arrive in time, 413
for one over the limit, 415 for one that is not JSON) with an OpenAI-style JSON error naming the field;
a full queue is a 429 with Retry-After; an engine that is down, a 503; nothing answers with a traceback.
Access (mingpt.serve.access) checks the Host header and the key before any route runs.
"""
import asyncio
import dataclasses
import json
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..sample.settings import DEFAULTS, SamplingSettings
from ..tokenizer import UnknownCharacterError
from .access import Access, add_access
from .body import BadRequest, CompletionBody, Limits, check_limits, error_body, read_body, read_json, request_settings
from .card import playground_html
from .engine import EngineStopped, Event, QueueFull, Request


# Seconds a stream waits without an event before it sends a comment line.
KEEP_ALIVE_S = 1.0


class EventBuffer:
    """A request's events, on the server's loop, up to `max_events` not yet taken: past that (a client that
    does not read its stream) the request is dropped (drop()) and its stream ends with an error, so that one
    slow reader never holds an unbounded backlog. Event index -1 marks that end."""

    def __init__(self, max_events: int, drop):
        self.queue, self.max_events, self.drop, self.overflowed = asyncio.Queue(), max_events, drop, False

    def put(self, event):
        if self.overflowed:
            return
        if self.queue.qsize() >= self.max_events:
            self.overflowed = True
            self.drop()
            event = Event(-1, finish_reason="error", status=503,
                          error=f"the client left over {self.max_events} events unread; the request was dropped")
        self.queue.put_nowait(event)

    async def get(self):
        return await self.queue.get()


class Completion:
    """One request in flight: the engine's events arrive in an EventBuffer on the server's loop."""

    def __init__(self, app_state, body: CompletionBody, prompts, stops):
        engine, limits = app_state.engine, app_state.limits
        self.body, self.model_name = body, app_state.model_name
        self.id, self.created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        try:
            ids = [engine.encode(p) for p in prompts]
        except (UnknownCharacterError, ValueError) as e:
            raise BadRequest(f"prompt: {e}", "prompt") from None
        self.prompt_tokens = sum(len(i) + 2 for i in ids)
        loop = asyncio.get_running_loop()
        self.events = EventBuffer(limits.max_stream_events, lambda: self.request.cancel())
        self.request = Request(ids, lambda event: loop.call_soon_threadsafe(self.events.put, event),
                               n=body.n, max_tokens=limits.default_max_tokens if body.max_tokens is None
                               else body.max_tokens, settings=request_settings(body, app_state.settings, stops),
                               sentiment=body.sentiment, seed=body.seed, logprobs=body.logprobs)
        self.prompts = [p for p in prompts for _ in range(body.n)]
        try:
            engine.submit(self.request)
        except QueueFull as e:
            raise BadRequest(str(e), None, 429, {"Retry-After": str(e.retry_after)}) from None
        except EngineStopped as e:
            raise BadRequest(str(e), None, 503, {"Retry-After": "5"}) from None
        except ValueError as e:
            raise BadRequest(str(e), "candidates") from None
        engine.metrics.prompt_tokens.inc(self.prompt_tokens)

    def chunk(self, choices, **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_name,
                "choices": choices, **extra}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    async def events_until_done(self, quiet_s=None):
        """The engine's events for this request, until every sample has ended (or the stream overflowed);
        with quiet_s, None after each quiet_s seconds without one."""
        left = len(self.request.choices)
        while left:
            try:
                event = await asyncio.wait_for(self.events.get(), quiet_s)
            except asyncio.TimeoutError:
                yield None
                continue
            left = 0 if event.index < 0 else left - (event.finish_reason is not None)
            yield event

    async def whole(self) -> dict:
        texts = [self.prompts[i] if self.body.echo else "" for i in range(len(self.prompts))]
        logprobs = [Logprobs(len(text)) for text in texts]
        ends, sentiments, tokens = {}, {}, 0
        async for event in self.events_until_done():
            if event.error:
                raise BadRequest(event.error, None, event.status or 500)
            texts[event.index] += event.text
            logprobs[event.index].add(event.logprobs)
            sentiments[event.index] = event.sentiment
            if event.finish_reason:
                ends[event.index], tokens = event.finish_reason, tokens + event.tokens
        choices = [{"text": text, "index": i, "finish_reason": ends[i], "sentiment": sentiments[i],
                    "logprobs": None if self.body.logprobs is None else logprobs[i].body()}
                   for i, text in enumerate(texts)]
        return self.chunk(choices, usage=self.usage(tokens))

    async def sse(self, http: HTTPRequest):
        """The server-sent events of a streamed completion, ending in [DONE]; leaving early cancels it."""
        tokens, offsets = 0, [len(p) if self.body.echo else 0 for p in self.prompts]
        try:
            if self.body.echo:
                for i, prompt in enumerate(self.prompts):
                    yield sse_line(self.chunk([choice_delta(i, prompt)]))
            async for event in self.events_until_done(quiet_s=KEEP_ALIVE_S):
                if event is None:  # quiet: a client gone is found here, and proxies see a comment line
                    if await http.is_disconnected():
                        return
                    yield ": keep-alive\n\n"
                    continue
                tokens += event.tokens if event.finish_reason else 0
                if event.error:
                    yield sse_line(error_body(event.error, kind="server_error"))
                    continue
                logprobs = None
                if self.body.logprobs is not None:
                    logprobs = Logprobs(offsets[event.index])
                    logprobs.add(event.logprobs)
                    offsets[event.index] = logprobs.offset
                    logprobs = logprobs.body()
                yield sse_line(self.chunk([choice_delta(event.index, event.text, event.sentiment,
                                                        event.finish_reason, logprobs)]))
            if (self.body.stream_options or {}).get("include_usage"):
                yield sse_line(self.chunk([], usage=self.usage(tokens)))
            yield "data: [DONE]\n\n"
        finally:
            self.request.cancel()  # a no-op once every sample has ended


class Logprobs:
    """OpenAI's logprobs of a completion choice (or of a streamed piece of one): each token's text, its
    log-probability under the model (the asked conditioning, before guidance and sampling controls), the
    likeliest alternatives, and where each token's text begins in the choice's text."""

    def __init__(self, offset: int):
        self.offset, self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = offset, [], [], [], []

    def add(self, entries):
        for _, text, logprob, top in entries:
            self.tokens.append(text)
            self.token_logprobs.append(logprob)
            self.top_logprobs.append(top)
            self.text_offset.append(self.offset)
            self.offset += len(text)

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def choice_delta(index, text, sentiment=None, finish_reason=None, logprobs=None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason,
            "sentiment": sentiment}


def sse_line(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def complete(http: HTTPRequest):
    state = http.app.state
    body = await read_body(http, state.limits)
    prompts, stops = check_limits(body, state.limits, state.engine.model.config.block_size)
    completion = Completion(state, body, prompts, stops)
    if body.stream:
        return StreamingResponse(completion.sse(http), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    waiter = asyncio.ensure_future(completion.whole())
    try:
        while not waiter.done():  # a client that goes away stops its samples
            await asyncio.wait({waiter}, timeout=0.5)
            if not waiter.done() and await http.is_disconnected():
                waiter.cancel()
                completion.request.cancel()
                return JSONResponse(error_body("the client went away"), status_code=499)
        return JSONResponse(waiter.result())
    finally:
        completion.request.cancel()


async def tokenize(http: HTTPRequest):
    """llama.cpp's /tokenize: {"content": text} -> {"tokens": [ids]} (the text alone: no context or sentiment)."""
    data = await read_json(http, http.app.state.limits)
    content = data.get("content")
    if not isinstance(content, str):
        raise BadRequest("content must be a string", "content")
    try:
        return {"tokens": http.app.state.engine.tokenizer.encode(content)}
    except UnknownCharacterError as e:
        raise BadRequest(f"content: {e}", "content") from None


async def detokenize(http: HTTPRequest):
    """llama.cpp's /detokenize: {"tokens": [ids]} -> {"content": text}."""
    data = await read_json(http, http.app.state.limits)
    tokens, vocab_size = data.get("tokens"), http.app.state.engine.tokenizer.vocab_size
    if not isinstance(tokens, list) or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size
                                           for t in tokens):
        raise BadRequest(f"tokens must be a list of token ids in [0, {vocab_size})", "tokens")
    return {"content": http.app.state.engine.tokenizer.decode(tokens)}


def add_error_handlers(app: FastAPI):
    @app.exception_handler(BadRequest)
    async def bad_request(_, e: BadRequest):
        kind = "server_error" if e.status >= 500 and e.status != 503 else "invalid_request_error"
        return JSONResponse(error_body(e.message, e.param, kind), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        param = str(first["loc"][-1]) if first["loc"] else None
        return JSONResponse(error_body(f"{param}: {first['msg']}", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", kind="server_error"), status_code=500)


def create_app(engine, model_name: str, card: dict, limits: Limits = Limits(),
               settings: SamplingSettings = DEFAULTS, access: Access = Access()) -> FastAPI:
    """The app around a running engine; the caller starts and closes the engine. `settings`: what a request
    gets for the sampling settings it does not set; `access`: Host names, API keys and CORS origins."""
    app = FastAPI(title="mingpt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.model_name, app.state.card, app.state.limits = engine, model_name, card, limits
    app.state.settings = settings
    add_error_handlers(app)
    add_access(app, access, engine.metrics)
    app.add_api_route("/v1/completions", complete, methods=["POST"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": card.get("created", 0),
                                            "owned_by": "mingpt"}]}

    @app.get("/health")
    async def health():
        state = engine.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/model_card")
    async def model_card():
        return {**card, "limits": dataclasses.asdict(limits), "sampling": dataclasses.asdict(settings)}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(playground_html())

    return app
