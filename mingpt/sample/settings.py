"""SamplingSettings: every control of how a sample is drawn, with one set of defaults, built once from
CLI flags (`add_flags`, `from_args`), an API body (mingpt.serve.api builds its fields from FIELDS) or
keyword arguments, and passed whole to every sampler and the server.

Adding a control touches this dataclass (its field, help and check), the samplers that apply it
(mingpt.sample.controls, the compiled sampler's glue in mingpt.sample.compiled) and nothing else: the
flags of `sample`, `evaluate` and `serve`, the interactive `:name value` commands and the API fields
all come from the fields here.

The defaults are the ones measured best on the speedrun model (docs/results.md, "Sampling defaults").
`SamplingSettings.plain()` is the model's own distribution: no truncation, no controls.
"""
import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Tuple

# The formats the compiled CPU sampler holds the weight matrices in: fp32 (exact), bf16, int8 (per-row scales).
WEIGHT_FORMATS = ("fp32", "bf16", "int8")
GUIDE_AGAINST = ("opposite", "none")
# The compiled sampler takes counts as 32-bit integers.
MAX_COUNT = 2 ** 31 - 1
# Each candidate is a row of the batch: a bound keeps one request from asking for an unbounded one.
MAX_CANDIDATES = 64


class SettingError(ValueError):
    """A sampling setting out of its range; `name` is the setting's field."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name} {message}")
        self.name = name


def _field(default, help: str, choices=None, api: bool = True):
    """A setting: its default, its help text (flags and API), its choices, and whether a request may set it."""
    return field(default=default, metadata={"help": help, "choices": choices, "api": api})


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = _field(0.9, "divide the logits by this before sampling (0: greedy)")
    top_k: int = _field(0, "sample among the k likeliest tokens (0: all)")
    top_p: float = _field(0.95, "sample within the smallest set of tokens holding this probability mass (1: all)")
    min_p: float = _field(0.0, "sample among tokens at least this share of the likeliest token's probability "
                               "(0: all)")
    guidance: float = _field(3.0, "classifier-free guidance toward the asked sentiment: >1 pushes away from "
                                  "guide_against (1: off)")
    guidance_tokens: int = _field(4, "guidance scales a sample's first N new tokens, where its sentiment is set, "
                                     "and guidance_after the rest (0: guidance scales every token)")
    guidance_after: float = _field(1.0, "the guidance scale after the first guidance_tokens new tokens (1: off)")
    guide_against: str = _field("opposite", "guidance's second conditioning: the opposite sentiment, or none "
                                            "(models trained with --sentiment_dropout)", GUIDE_AGAINST)
    repetition_penalty: float = _field(1.0, "divide (multiply, if negative) the logits of tokens already in the "
                                            "sample (1: off)")
    no_repeat_ngram_size: int = _field(2, "never repeat an n-gram of this size (0: off)")
    candidates: int = _field(8, "draw this many candidates of each sample and keep the one the model itself finds "
                                "likeliest under the asked conditioning against guide_against (1: off)")
    stop: Tuple[str, ...] = _field((), "end a sample where this text first appears (repeatable)")
    weights: str = _field("fp32", "the format the compiled CPU sampler holds the weight matrices in: fp32 "
                                  "(exact), bf16, int8 (per-row scales); activations stay fp32", WEIGHT_FORMATS,
                          api=False)

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        for name, off in (("top_k", 0), ("top_p", 1.0)):  # None: no truncation
            if getattr(self, name) is None:
                object.__setattr__(self, name, off)
        for name in ("temperature", "guidance", "guidance_after"):
            check_number(name, getattr(self, name), ">= 0", lambda v: v >= 0)
        check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        check_number("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        check_number("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0)
        for name, low, high in (("top_k", 0, MAX_COUNT), ("guidance_tokens", 0, MAX_COUNT),
                                ("no_repeat_ngram_size", 0, MAX_COUNT), ("candidates", 1, MAX_CANDIDATES)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise SettingError(name, f"must be an integer >= {low} (at most {high}), got {value!r}")
        if self.guide_against not in GUIDE_AGAINST:
            raise SettingError("guide_against", f"must be one of {', '.join(GUIDE_AGAINST)}, got {self.guide_against!r}")
        if self.weights not in WEIGHT_FORMATS:
            raise SettingError("weights", f"names an unknown weight format {self.weights!r}; choose one of "
                                          f"{', '.join(WEIGHT_FORMATS)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SettingError("stop", f"strings must be non-empty strings, got {list(self.stop)!r}")

    @property
    def guided(self) -> bool:
        """Whether any new token is guided: the samplers then run the second conditioning beside."""
        return self.guidance != 1.0 or (self.guidance_tokens > 0 and self.guidance_after != 1.0)

    @property
    def needs_guidance_idx(self) -> bool:
        """Whether generate needs each row's prompt under the second conditioning: to guide, or to choose
        among candidates."""
        return self.guided or self.candidates > 1

    def guidance_at(self, step: int) -> float:
        """The guidance scale of the step-th new token (0: the first)."""
        return self.guidance if self.guidance_tokens == 0 or step < self.guidance_tokens else self.guidance_after

    def replace(self, **changes) -> "SamplingSettings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def plain(cls, **changes) -> "SamplingSettings":
        """The model's own distribution (temperature 1, no truncation, no guidance or penalties), with changes."""
        return cls(**{**dict(temperature=1.0, top_p=1.0, guidance=1.0, guidance_tokens=0, guidance_after=1.0,
                             no_repeat_ngram_size=0, candidates=1), **changes})


def check_number(name: str, value, rule: str, ok):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise SettingError(name, f"must be {rule} (a finite number), got {value!r}")


FIELDS = {f.name: f for f in dataclasses.fields(SamplingSettings)}
DEFAULTS = SamplingSettings()


def add_flags(parser: argparse.ArgumentParser, defaults: SamplingSettings = DEFAULTS):
    """One --flag per setting (--stop repeatable), defaulting to `defaults`."""
    for name, f in FIELDS.items():
        default = getattr(defaults, name)
        if name == "stop":
            parser.add_argument("--stop", action="append", default=list(default), metavar="TEXT",
                                help=f.metadata["help"] + "; the sample keeps it")
            continue
        parser.add_argument(f"--{name}", type=type(default), default=default, choices=f.metadata["choices"],
                            help=f"{f.metadata['help']} (default: {default})")


def from_args(args: argparse.Namespace, parser: argparse.ArgumentParser = None) -> SamplingSettings:
    """The settings of parsed add_flags flags. An out-of-range value is a SettingError naming it, or, given
    the parser, its usage error (exit 2) naming the flag."""
    try:
        return SamplingSettings(**{name: getattr(args, name) for name in FIELDS})
    except SettingError as e:
        if parser is None:
            raise
        parser.error(f"--{e}")


def request_fields() -> dict:
    """The settings a request to the server may set: name -> (type of its value, help)."""
    return {name: (type(getattr(DEFAULTS, name)), f.metadata["help"]) for name, f in FIELDS.items()
            if f.metadata["api"]}
