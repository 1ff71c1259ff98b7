"""Best of n candidates, by the model's own judgement: each prompt row is drawn `settings.candidates`
times and the draw kept is the one with the largest conditioning margin, log p(text | the row's prompt)
- log p(text | its prompt under the second conditioning). For a review, that is the log-likelihood ratio
of the asked sentiment token against the opposite one (or against none, with guide_against none): the
sentiment the generator itself reads in the text, with no outside judge. Each candidate is an ordinary
draw, so the kept text is as natural as the sampler's; guidance instead bends every token toward the
sentiment.
"""
import torch

# Rows scored per forward pass: bounds the (rows, length, vocab) logits held at once.
SCORE_ROWS = 64


def tokens_to_score(new, eos_id):
    """1.0 where a new token counts: up to and including each row's first eos_id."""
    if eos_id is None:
        return torch.ones_like(new, dtype=torch.float32)
    is_end = (new == eos_id).int()
    return ((is_end.cumsum(1) - is_end) == 0).float()


@torch.no_grad()
def conditioning_margin(model, drawn, second_prompts, eos_id=None):
    """Per row of drawn (its prompt, then new tokens): the summed log-probability of its new tokens after its
    own prompt minus after second_prompts' row (same length as the prompt), over the new tokens that fit
    in the model's block together with the prompt."""
    prompt_length = second_prompts.shape[1]
    drawn = drawn[:, :model.config.block_size]
    new = drawn[:, prompt_length:]
    margins = torch.zeros(drawn.shape[0], device=drawn.device)
    if new.shape[1] == 0:
        return margins
    counted = tokens_to_score(new, eos_id)
    was_training = model.training
    model.eval()
    try:
        for rows in torch.arange(drawn.shape[0], device=drawn.device).split(SCORE_ROWS):
            for sign, prompts in ((1.0, drawn[rows, :prompt_length]), (-1.0, second_prompts[rows])):
                logits = model(torch.cat([prompts, new[rows]], 1))[0][:, prompt_length - 1:-1]
                log_probs = logits.float().log_softmax(-1).gather(-1, new[rows].unsqueeze(-1)).squeeze(-1)
                margins[rows] += sign * (log_probs * counted[rows]).sum(1)
    finally:
        model.train(was_training)
    return margins


def best_rows(margins, candidates: int):
    """Of each run of `candidates` consecutive rows, the index of the one with the largest margin."""
    return margins.view(-1, candidates).argmax(1) + torch.arange(0, margins.numel(), candidates,
                                                                  device=margins.device)
