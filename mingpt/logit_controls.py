"""What shapes each next-token distribution before temperature, top-k and top-p, in the order of
Hugging Face `generate`'s logits processors (guidance, repetition penalty, no-repeat n-grams); the
reference that the compiled sampler is tested against.

  guidance              classifier-free guidance: each row also runs under a second conditioning (the
                        opposite sentiment, or none), and its log-probabilities are pushed away from
                        that one's: second + g * (first - second). 1: off; 0: the second alone.
  guidance_tokens       n: only a sample's first n new tokens, where its sentiment is set, take the guidance
                        scale; later ones take guidance_after, so that a sample stays varied and ends about
                        where the model would. 0: every new token takes the guidance scale.
  guidance_after        the guidance scale after the first guidance_tokens new tokens. 1: off.
  repetition_penalty    a token already in the row (prompt included) has its logit divided by the
                        penalty where positive, multiplied where negative. 1: off.
  no_repeat_ngram_size  n: a token that would repeat an n-gram of the row (prompt included) is
                        banned. 0: off.
"""
import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class LogitControls:
    guidance: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    guidance_tokens: int = 0
    guidance_after: float = 1.0

    def __post_init__(self):
        if not self.guidance >= 0:
            raise ValueError(f"guidance must be >= 0 (1: off), got {self.guidance}")
        if not self.guidance_after >= 0:
            raise ValueError(f"guidance_after must be >= 0 (1: off), got {self.guidance_after}")
        if isinstance(self.guidance_tokens, bool) or not isinstance(self.guidance_tokens, int) \
                or self.guidance_tokens < 0:
            raise ValueError(f"guidance_tokens must be an integer >= 0 (0: every token), got {self.guidance_tokens}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}")
        if isinstance(self.no_repeat_ngram_size, bool) or not isinstance(self.no_repeat_ngram_size, int) \
                or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0: off), got {self.no_repeat_ngram_size}")

    @property
    def guided(self) -> bool:
        """Whether any new token is guided: the samplers then run the second conditioning beside."""
        return self.guidance != 1.0 or (self.guidance_tokens > 0 and self.guidance_after != 1.0)

    def guidance_at(self, step: int) -> float:
        """The guidance scale of the step-th new token (0: the first)."""
        return self.guidance if self.guidance_tokens == 0 or step < self.guidance_tokens else self.guidance_after


def guide(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """(2R, V) logits, the first R rows under the asked conditioning and the last R under the second
    one, to R rows of guided log-probabilities."""
    first, second = logits.float().log_softmax(-1).chunk(2)
    return second + guidance * (first - second)


def penalize_repetition(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    seen = logits.gather(1, history)
    return logits.scatter(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))


def banned_ngram_tokens(row: list, n: int) -> list:
    """The tokens that would end an n-gram already in `row`, after its last n-1 tokens."""
    if len(row) + 1 < n:
        return []
    prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
    return sorted({row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix})


def apply_controls(logits: torch.Tensor, history: torch.Tensor, controls: LogitControls,
                   step: int = 0) -> torch.Tensor:
    """logits: (R, V), or (2R, V) guided (see `guide`); history: (R, T) the tokens of each row so far;
    step: how many new tokens each row holds before this one."""
    if controls.guided:
        logits = guide(logits, controls.guidance_at(step))
    if controls.repetition_penalty != 1.0:
        logits = penalize_repetition(logits, history, controls.repetition_penalty)
    if controls.no_repeat_ngram_size:
        logits = logits.clone()
        for r, row in enumerate(history.tolist()):
            logits[r, banned_ngram_tokens(row, controls.no_repeat_ngram_size)] = float("-inf")
    return logits
