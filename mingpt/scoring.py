"""The loss every tokenizer shares: nats per character of held-out reviews, given their sentiment.

Train logs it at every evaluation and `evaluate` reports it, so that char and BPE models, and runs with
different vocabularies, compare on one scale.
"""
import torch
import torch.nn.functional as F

from .tokenizer import PAD, SENTIMENT_TOKENS


def review_windows(ids: list, block: int, pad_id: int) -> list:
    """(inputs, targets) rows of block tokens that score each of ids[2:] once (the targets before are
    -1): one row, or windows that slide by half a block, each scoring the targets it adds."""
    rows, start, scored = [], 0, 2
    while True:
        window = ids[start:start + block + 1]
        targets = [t if start + 1 + k >= scored else -1 for k, t in enumerate(window[1:])]
        pad = block - len(targets)
        rows.append((window[:-1] + [pad_id] * pad, targets + [-1] * pad))
        scored = start + len(window)
        if scored >= len(ids):
            return rows
        start += block // 2


@torch.no_grad()
def nats_per_char(model, tokenizer, layout, reviews, batch_size: int = 64) -> float:
    """The loss every tokenizer shares: the mean negative log-likelihood, in nats per character, of each
    review's characters and its end token (counted as one character) given the context token and its
    sentiment token."""
    context, end, pad = (tokenizer.token_id(t) for t in (layout.context_token, layout.end_token, PAD))
    rows, characters = [], 0
    for sentiment, text in reviews:
        ids = [context, tokenizer.token_id(SENTIMENT_TOKENS[sentiment])] + tokenizer.encode(text) + [end]
        rows += review_windows(ids, model.config.block_size, pad)
        characters += len(text) + 1
    device = model.transformer.wte.weight.device
    total = 0.0
    for first in range(0, len(rows), batch_size):
        x, y = (torch.tensor(part, device=device) for part in zip(*rows[first:first + batch_size]))
        logits, _ = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum").item()
    return total / characters
