"""What shapes each next-token distribution before temperature, top-k and top-p, in the order of
Hugging Face `generate`'s logits processors (guidance, repetition penalty, no-repeat n-grams); the
reference that the compiled sampler is tested against. The settings are mingpt.sample.settings':

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
import torch

from .settings import SamplingSettings


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


def apply_controls(logits: torch.Tensor, history: torch.Tensor, settings: SamplingSettings,
                   step: int = 0) -> torch.Tensor:
    """logits: (R, V), or (2R, V) guided (see `guide`); history: (R, T) the tokens of each row so far;
    step: how many new tokens each row holds before this one."""
    first, second = logits.chunk(2) if settings.guided else (logits, None)
    return apply_row_controls(first, second, history.tolist(), settings, [step] * first.shape[0])


def apply_row_controls(first: torch.Tensor, second: torch.Tensor, histories: list, settings: SamplingSettings,
                       steps: list) -> torch.Tensor:
    """The controls for rows each at its own step (the server's running batch; apply_controls for rows at one):
    first and second (R, V) the logits under the asked and the second conditioning (second None: no row is
    guided), histories each row's tokens so far (lists of any lengths), steps each row's count of new tokens."""
    logits = first
    if second is not None:
        scale = torch.tensor([settings.guidance_at(step) for step in steps], device=first.device)[:, None]
        logits = guide(torch.cat([first, second]), scale)
    if settings.repetition_penalty != 1.0:  # shorter rows repeat their own first token: a token seen twice
        width = max(map(len, histories))
        padded = torch.tensor([row + row[:1] * (width - len(row)) for row in histories], device=first.device)
        logits = penalize_repetition(logits, padded, settings.repetition_penalty)
    if settings.no_repeat_ngram_size:
        banned = [(r, token) for r, row in enumerate(histories)
                  for token in banned_ngram_tokens(row, settings.no_repeat_ngram_size)]
        if banned:
            rows, tokens = torch.tensor(banned, device=first.device).T
            logits = logits.index_put((rows, tokens), torch.tensor(float("-inf"), device=first.device))
    return logits
