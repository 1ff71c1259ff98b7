"""Plain dataclasses for the model and the training run, the presets, and overrides.

Precedence, lowest first: dataclass defaults < preset < JSON config file < CLI flags.
"""
import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Optional


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 252
    block_size: int = 64
    vocab_size: int = 4096
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    # Architecture options after GPT-2 (docs/results.md, "A modern recipe"); the defaults are GPT-2's.
    norm: str = "layernorm"  # layernorm | rmsnorm (no mean, no bias)
    positions: str = "learned"  # learned (an embedding per position) | rotary (queries and keys rotated)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys, with a learned gain per channel
    mlp: str = "gelu"  # gelu (tanh approximation) | relu2 (ReLU squared)
    tie_head: bool = True  # the output head shares the token embedding
    logit_softcap: float = 0.0  # above 0: logits are cap * tanh(logits / cap)
    bigram_buckets: int = 0  # above 0: add an embedding of each (previous token, token) pair, hashed into this many rows

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0.0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        for name, choices in ARCHITECTURE_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"GPTConfig.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.positions == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary positions rotate pairs of channels: the head size "
                             f"{self.n_embd // self.n_head} (n_embd / n_head) must be even")
        if self.bigram_buckets < 0:
            raise ValueError(f"bigram_buckets must be >= 0 (0: off), got {self.bigram_buckets}")
        if not self.logit_softcap >= 0.0:
            raise ValueError(f"logit_softcap must be >= 0 (0: off), got {self.logit_softcap}")

    def options_after_gpt2(self) -> list:
        """The architecture options set away from GPT-2's, as name=value (what GPT-2 formats cannot hold)."""
        gpt2 = GPTConfig()
        return [f"{name}={getattr(self, name)}" for name in ARCHITECTURE_OPTIONS
                if getattr(self, name) != getattr(gpt2, name)]


ARCHITECTURE_CHOICES = {"norm": ("layernorm", "rmsnorm"), "positions": ("learned", "rotary"), "mlp": ("gelu", "relu2")}
ARCHITECTURE_OPTIONS = ("norm", "positions", "qk_norm", "mlp", "tie_head", "logit_softcap", "bigram_buckets")


@dataclass
class TrainConfig:
    data_dir: Optional[str] = None
    out_dir: str = "out"
    preset: str = "demo"
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 1337
    batch_size: int = 32
    grad_accum: int = 1
    max_iters: int = 600
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 50
    lr_decay_iters: Optional[int] = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_minutes: Optional[float] = None
    eval_iters: int = 20
    eval_sample_tokens: int = 32
    log_interval: int = 10
    max_minutes: Optional[float] = None
    resume: bool = False
    overwrite: bool = False
    init_from: Optional[str] = None
    balance: str = "auto"
    sentiment_dropout: float = 0.0
    csv: Optional[str] = None
    tokenizer: str = "char"
    bpe_vocab_size: int = 2000
    corpus_share: float = 0.0
    corpus_fade: bool = True
    pack: bool = False
    reshuffle: bool = False
    optimizer: str = "adamw"
    schedule: str = "cosine"
    decay_fraction: float = 0.3
    ema_decay: float = 0.0
    tensorboard: bool = False
    progress: bool = True
    threads: Optional[int] = None
    model: GPTConfig = field(default_factory=GPTConfig)

    def check(self):
        """Refuse values no run can use, naming them (after every override is applied)."""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.corpus_share < 1.0:
            raise ValueError(f"corpus_share must be in [0, 1), got {self.corpus_share}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.eval_minutes is not None and not self.eval_minutes > 0:
            raise ValueError(f"eval_minutes must be > 0, got {self.eval_minutes}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.csv and self.data_dir:
            raise ValueError("csv is prepared into out_dir/data: give csv or data_dir, not both")


SCHEDULES = ("cosine", "wsd")


# The best review model in a wall-clock budget on a small CPU: `train --preset speedrun --csv FILE`.
# Measured choices (docs/results.md, "A review model in 10 minutes"): packed rows, Muon, warmup-stable-decay
# on the clock, bfloat16 autocast where the machine runs bf16 faster than fp32 (dtype auto), 70 % of the
# training reviews from the embedded corpus throughout, and the user's reviews drawn as they come
# (oversampling a minority sentiment memorises it), and rotary positions ("A modern recipe": 0.1 nats/char
# at 4 minutes, where no other architecture option gained more than the run-to-run spread), each review
# once a pass (reshuffle: 0.045 at 4 minutes, two seeds). The shape follows the budget (BUDGETS).
SPEEDRUN = dict(
    model=dict(block_size=64, dropout=0.1, bias=True, positions="rotary"),
    batch_size=32, learning_rate=2e-3, min_lr=2e-5, warmup_iters=30, max_iters=1_000_000, eval_minutes=2.0,
    max_minutes=10.0, dtype="auto", pack=True, optimizer="muon", schedule="wsd", decay_fraction=0.4,
    corpus_share=0.7, corpus_fade=False, balance="off", reshuffle=True,
)

PRESETS = {
    # The original my_min_gpt model: ~9.7M parameters with a ~2.2k character vocabulary.
    "seed": dict(
        model=dict(n_layer=12, n_head=12, n_embd=252, block_size=64, dropout=0.1, bias=True),
        batch_size=32, learning_rate=6e-4, min_lr=6e-5, warmup_iters=100, max_iters=5000,
        eval_interval=250,
    ),
    # The speedrun recipe in 4 minutes on the data it is given (make demo: the embedded corpus alone).
    "demo": {**SPEEDRUN, "max_minutes": 4.0, "eval_minutes": 1.0, "corpus_share": 0.0},
    "speedrun": SPEEDRUN,
    # Tiny, for tests.
    "tiny": dict(
        model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0, bias=True),
        batch_size=8, learning_rate=3e-3, min_lr=3e-4, warmup_iters=5, max_iters=50,
        eval_interval=25, eval_iters=4,
    ),
}

# What the budgeted presets (speedrun, demo) set for a run of max_minutes: the first entry whose limit it is
# within (docs/results.md, "One recipe at every budget": 4x128 leads 6x192 at 4 minutes, they tie at 10;
# at 10 minutes decaying over the last 60 % gained 0.012 and 0.023 (two seeds); past 10 minutes the preset
# memorised the movie reviews, and twice its dropout and 5x its weight decay kept a 30-minute run improving
# to the end; since the step's kernels made 10 minutes 45 % more steps, 10 minutes memorise too without them:
# 3.7574 and 3.7746 with them, 3.8930 and 3.9044 without).
REGULARISED = dict(model=dict(n_layer=6, n_head=6, n_embd=192, dropout=0.2), weight_decay=0.5)
BUDGETS = ((8.0, dict(model=dict(n_layer=4, n_head=4, n_embd=128))),
           (15.0, {**REGULARISED, "decay_fraction": 0.6}),
           (float("inf"), REGULARISED))


def budget_settings(max_minutes: Optional[float]) -> dict:
    """The BUDGETS entry for a budget (None: no budget, the last)."""
    return next(settings for limit, settings in BUDGETS
                if max_minutes is not None and max_minutes <= limit or limit == float("inf"))


def apply_overrides(cfg, overrides: dict, source: str):
    """Set fields of a (nested) dataclass from a dict, rejecting unknown keys by name."""
    known = {f.name: f for f in fields(cfg)}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"{source}: unknown option {key!r} for {type(cfg).__name__}; "
                             f"known: {', '.join(sorted(known))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: option {key!r} must be an object")
            apply_overrides(current, value, f"{source}.{key}")
        else:
            setattr(cfg, key, value)
    return cfg


def preset_config(name: str, max_minutes: Optional[float] = None) -> TrainConfig:
    """A preset's TrainConfig; a budgeted preset (one that sets max_minutes) for its own budget or for
    max_minutes, with the settings of that budget (BUDGETS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = apply_overrides(TrainConfig(preset=name), PRESETS[name], f"preset {name!r}")
    if cfg.max_minutes is not None:
        cfg.max_minutes = max_minutes or cfg.max_minutes
        apply_overrides(cfg, budget_settings(cfg.max_minutes), f"preset {name!r} for {cfg.max_minutes} minutes")
    return cfg


def load_config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a JSON object")
    return data


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _optional(kind):
    def parse(text):
        return None if text.lower() == "none" else kind(text)
    return parse


_ARG_TYPES = {int: int, float: float, str: str, bool: _parse_bool,
              Optional[int]: _optional(int), Optional[float]: _optional(float), Optional[str]: _optional(str)}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, help_texts: dict, prefix: str = ""):
    """One --flag per scalar dataclass field (nested dataclasses get their own call); flags default to
    None so unset flags override nothing."""
    for f in fields(cls):
        if dataclasses.is_dataclass(f.type):
            continue
        if f.type not in _ARG_TYPES:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line parser for type {f.type}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        is_bool = f.type is bool
        parser.add_argument(f"--{prefix}{f.name}", type=_ARG_TYPES[f.type], default=None,
                            nargs="?" if is_bool else None, const=True if is_bool else None,
                            help=f"{help_texts.get(f.name, '')} (default: {default})".strip())


def collect_overrides(args: argparse.Namespace, cls, prefix: str = "") -> dict:
    out = {}
    for f in fields(cls):
        value = getattr(args, f"{prefix}{f.name}", None)
        if value is not None:
            out[f.name] = value
    return out
