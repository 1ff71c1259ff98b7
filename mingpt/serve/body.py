"""What a completions request may send, and its checks: the body read as JSON within its limits (size,
time, Content-Type), the protocol's fields and the sampling settings, each a 400 naming its field."""
import asyncio
import dataclasses
import json
from typing import List, Literal, Optional, Union

from fastapi import Request as HTTPRequest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..sample.settings import SamplingSettings, SettingError, request_fields


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
    max_stop_chars: int = 64
    max_logprobs: int = 5
    max_body_bytes: int = 65536
    body_timeout_s: float = 10.0
    max_stream_events: int = 4096  # events a stream's client has not read yet; beyond, the request is dropped


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


def check_limits(body: CompletionBody, limits: Limits, block_size: int):
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
        (body.logprobs is None or 0 <= body.logprobs <= limits.max_logprobs, "logprobs",
         f"logprobs must be from 0 to {limits.max_logprobs}"),
        (body.no_repeat_ngram_size is None or body.no_repeat_ngram_size <= block_size, "no_repeat_ngram_size",
         f"no_repeat_ngram_size must be at most the model's block of {block_size}"),
    ]
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    checks += [(len(stops) <= limits.max_stop, "stop", f"at most {limits.max_stop} stop strings"),
               (all(stops), "stop", "a stop string must not be empty"),
               (all(len(stop) <= limits.max_stop_chars for stop in stops), "stop",
                f"a stop string may hold at most {limits.max_stop_chars} characters")]
    for ok, param, message in checks:
        if not ok:
            raise BadRequest(message, param)
    return prompts, stops


async def read_json(http: HTTPRequest, limits: Limits) -> dict:
    """The request's JSON object: 415 if its Content-Type is not JSON (a cross-site form or no-cors fetch
    cannot send one without a preflight), 413 over the size limit, 408 if it does not arrive in time."""
    kind = http.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise BadRequest(f"the body must be JSON, sent with Content-Type: application/json (got {kind or 'none'!r})",
                         None, 415)
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise BadRequest(f"the body is over {limits.max_body_bytes} bytes", None, 413)
    try:
        raw = await asyncio.wait_for(read_raw(http, limits), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(f"the body did not arrive within {limits.body_timeout_s:g} s", None, 408) from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also an integer of too many digits
        message = "it nests too deeply" if isinstance(e, RecursionError) else str(e)
        raise BadRequest(f"the body is not valid JSON: {message}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


async def read_raw(http: HTTPRequest, limits: Limits) -> bytes:
    raw = b""
    async for chunk in http.stream():
        raw += chunk
        if len(raw) > limits.max_body_bytes:
            raise BadRequest(f"the body is over {limits.max_body_bytes} bytes", None, 413)
    return raw


async def read_body(http: HTTPRequest, limits: Limits) -> CompletionBody:
    data = await read_json(http, limits)
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
