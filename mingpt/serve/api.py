"""The HTTP face of the serving engine (FastAPI): an OpenAI-compatible `POST /v1/completions` (with
server-sent events), `GET /v1/models`, `GET /health`, `GET /v1/model_card` and the web playground at `/`.

Every bad request is a 400 (413 for a body over the limit) with an OpenAI-style JSON error naming the
field; a full queue is a 429 with Retry-After; nothing answers with a traceback.
"""
import asyncio
import dataclasses
import json
import os
import time
import uuid
from importlib import resources
from typing import List, Literal, Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException

from ..sample.settings import DEFAULTS, SamplingSettings, SettingError, request_fields
from ..tokenizer import UnknownCharacterError
from .engine import EngineStopped, QueueFull, Request


@dataclasses.dataclass
class Limits:
    """What one request may ask for; `python -m mingpt.serve` sets each from a flag."""
    max_tokens: int = 256
    default_max_tokens: int = 100
    max_n: int = 8
    max_candidates: int = 16
    max_prompts: int = 8
    max_prompt_chars: int = 256
    max_stop: int = 4
    max_body_bytes: int = 65536


class BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400, headers=None):
        super().__init__(message)
        self.message, self.param, self.status, self.headers = message, param, status, headers


class ProtocolFields(BaseModel):
    """The fields of OpenAI's completions request that mingpt serves, and the review's sentiment."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: Optional[str] = None
    prompt: Union[str, List[str]] = ""
    max_tokens: Optional[int] = Field(None, ge=0)
    n: int = Field(1, ge=1)
    stop: Union[None, str, List[str]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 63)
    stream: bool = False
    stream_options: Optional[dict] = None
    echo: bool = False
    logprobs: Optional[int] = None
    sentiment: Literal["pos", "neg", "auto"] = "auto"


# Every SamplingSettings field a request may set, under its own name (stop is the protocol's); null or absent
# leaves the server's setting. Their ranges are the settings' own (a SettingError names the field).
CompletionBody = create_model("CompletionBody", __base__=ProtocolFields,
                              **{name: (Optional[kind], Field(None, description=help))
                                 for name, (kind, help) in request_fields().items() if name != "stop"})


def error_body(message: str, param=None, kind="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def check_limits(body: CompletionBody, limits: Limits):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    checks = [
        (len(prompts) >= 1, "prompt", "prompt must be a string or a non-empty list of strings"),
        (len(prompts) <= limits.max_prompts, "prompt", f"at most {limits.max_prompts} prompts a request"),
        (all(len(p) <= limits.max_prompt_chars for p in prompts), "prompt",
         f"a prompt may hold at most {limits.max_prompt_chars} characters"),
        (body.max_tokens is None or body.max_tokens <= limits.max_tokens, "max_tokens",
         f"max_tokens must be at most {limits.max_tokens}"),
        (body.n <= limits.max_n, "n", f"n must be at most {limits.max_n}"),
        (len(prompts) * body.n <= limits.max_n * limits.max_prompts, "n", "too many samples in one request"),
        (body.candidates is None or body.candidates <= limits.max_candidates, "candidates",
         f"candidates must be at most {limits.max_candidates}"),
        (body.logprobs is None, "logprobs", "logprobs are not supported"),
    ]
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    checks += [(len(stops) <= limits.max_stop, "stop", f"at most {limits.max_stop} stop strings"),
               (all(stops), "stop", "a stop string must not be empty")]
    for ok, param, message in checks:
        if not ok:
            raise BadRequest(message, param)
    return prompts, stops


async def read_body(http: HTTPRequest, limits: Limits) -> CompletionBody:
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise BadRequest(f"the body is over {limits.max_body_bytes} bytes", None, 413)
    raw = b""
    async for chunk in http.stream():
        raw += chunk
        if len(raw) > limits.max_body_bytes:
            raise BadRequest(f"the body is over {limits.max_body_bytes} bytes", None, 413)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return CompletionBody.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise BadRequest(f"{param}: {first['msg']}", param) from None


def request_settings(body: CompletionBody, defaults: SamplingSettings, stops) -> SamplingSettings:
    """The server's settings with what the body sets; a value out of range is a 400 naming its field."""
    given = {name: getattr(body, name) for name in request_fields() if name != "stop"}
    try:
        return defaults.replace(stop=tuple(stops), **{k: v for k, v in given.items() if v is not None})
    except SettingError as e:
        raise BadRequest(str(e), e.name) from None


class Completion:
    """One request in flight: the engine's events arrive on an asyncio queue of the server's loop."""

    def __init__(self, app_state, body: CompletionBody, prompts, stops):
        engine, limits = app_state.engine, app_state.limits
        self.body, self.model_name = body, app_state.model_name
        self.id, self.created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        try:
            ids = [engine.encode(p) for p in prompts]
        except (UnknownCharacterError, ValueError) as e:
            raise BadRequest(f"prompt: {e}", "prompt") from None
        self.prompt_tokens = sum(len(i) + 2 for i in ids)
        self.events, loop = asyncio.Queue(), asyncio.get_running_loop()
        self.request = Request(ids, lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event),
                               n=body.n, max_tokens=limits.default_max_tokens if body.max_tokens is None
                               else body.max_tokens, settings=request_settings(body, app_state.settings, stops),
                               sentiment=body.sentiment, seed=body.seed)
        self.prompts = [p for p in prompts for _ in range(body.n)]
        try:
            engine.submit(self.request)
        except QueueFull as e:
            raise BadRequest(str(e), None, 429, {"Retry-After": str(e.retry_after)}) from None
        except EngineStopped as e:
            raise BadRequest(str(e), None, 503, {"Retry-After": "5"}) from None

    def chunk(self, choices, **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_name,
                "choices": choices, **extra}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    async def events_until_done(self):
        """The engine's events for this request, until every sample has ended."""
        left = len(self.request.choices)
        while left:
            event = await self.events.get()
            left -= event.finish_reason is not None
            yield event

    async def whole(self) -> dict:
        texts = [self.prompts[i] if self.body.echo else "" for i in range(len(self.prompts))]
        ends, sentiments, tokens = {}, {}, 0
        async for event in self.events_until_done():
            if event.error:
                raise BadRequest(event.error, None, 500)
            texts[event.index] += event.text
            sentiments[event.index] = event.sentiment
            if event.finish_reason:
                ends[event.index], tokens = event.finish_reason, tokens + event.tokens
        choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": ends[i],
                    "sentiment": sentiments[i]} for i, text in enumerate(texts)]
        return self.chunk(choices, usage=self.usage(tokens))

    async def sse(self):
        """The server-sent events of a streamed completion, ending in [DONE]; leaving early cancels it."""
        tokens = 0
        try:
            if self.body.echo:
                for i, prompt in enumerate(self.prompts):
                    yield sse_line(self.chunk([choice_delta(i, prompt)]))
            async for event in self.events_until_done():
                tokens += event.tokens if event.finish_reason else 0
                if event.error:
                    yield sse_line(error_body(event.error, kind="server_error"))
                    continue
                yield sse_line(self.chunk([choice_delta(event.index, event.text, event.sentiment,
                                                        event.finish_reason)]))
            if (self.body.stream_options or {}).get("include_usage"):
                yield sse_line(self.chunk([], usage=self.usage(tokens)))
            yield "data: [DONE]\n\n"
        finally:
            self.request.cancel()  # a no-op once every sample has ended


def choice_delta(index, text, sentiment=None, finish_reason=None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason, "sentiment": sentiment}


def sse_line(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def complete(http: HTTPRequest):
    state = http.app.state
    body = await read_body(http, state.limits)
    prompts, stops = check_limits(body, state.limits)
    completion = Completion(state, body, prompts, stops)
    if body.stream:
        return StreamingResponse(completion.sse(), media_type="text/event-stream",
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


def playground_html() -> str:
    return resources.files("mingpt.serve").joinpath("static/playground.html").read_text(encoding="utf-8")


def create_app(engine, model_name: str, card: dict, limits: Limits = Limits(),
               settings: SamplingSettings = DEFAULTS) -> FastAPI:
    """The app around a running engine; the caller starts and closes the engine. `settings`: what a request
    gets for the sampling settings it does not set."""
    app = FastAPI(title="mingpt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.model_name, app.state.card, app.state.limits = engine, model_name, card, limits
    app.state.settings = settings
    add_error_handlers(app)
    app.add_api_route("/v1/completions", complete, methods=["POST"])

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": card.get("created", 0),
                                            "owned_by": "mingpt"}]}

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/v1/model_card")
    async def model_card():
        return {**card, "limits": dataclasses.asdict(limits), "sampling": dataclasses.asdict(settings)}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(playground_html())

    return app


def model_card(name: str, ckpt_path: str, model, tokenizer, data: dict, record: Optional[dict], sampler: str) -> dict:
    """What /v1/model_card says: the config, the vocabulary, the data and how training went (from the
    run's run.json where there is one)."""
    record = record or {}
    created = os.path.getmtime(ckpt_path) if os.path.exists(ckpt_path) else 0
    return {"id": name, "checkpoint": ckpt_path,
            "created": int(created), "config": dataclasses.asdict(model.config), "parameters": model.num_params(),
            "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.kind, "sampler": sampler,
            "data": {**{k: v for k, v in data.items() if v is not None}, **(record.get("data") or {})},
            "training": {k: record[k] for k in ("status", "started", "ended", "iter", "losses", "best_val_loss")
                         if k in record}}
