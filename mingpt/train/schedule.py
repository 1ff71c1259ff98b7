"""The learning-rate schedule: a linear warmup, then cosine over the steps or warmup-stable-decay (wsd) over
the steps or the max_minutes budget, whichever ends first."""
import math

from ..config import TrainConfig


def schedule_level(it: int, cfg: TrainConfig, time_share: float = 0.0) -> float:
    """How far from decayed the run is after warmup: 1 at the peak learning rate, 0 at min_lr. cosine decays
    over the steps; wsd (warmup-stable-decay) holds 1 until the last decay_fraction of the run, then falls
    linearly. wsd's run is max_iters steps or the max_minutes budget, whichever ends first: `time_share` is
    the share of the budget spent."""
    if cfg.schedule == "wsd":
        left = 1.0 - max(it / cfg.max_iters, time_share)
        return min(1.0, max(0.0, left) / cfg.decay_fraction)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it >= decay_iters:
        return 0.0
    ratio = max(0.0, (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    return 0.5 * (1.0 + math.cos(math.pi * ratio))


def learning_rate(it: int, cfg: TrainConfig, time_share: float = 0.0) -> float:
    """A linear warmup over warmup_iters, then the schedule's level between learning_rate and min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    return cfg.min_lr + schedule_level(it, cfg, time_share) * (cfg.learning_rate - cfg.min_lr)
