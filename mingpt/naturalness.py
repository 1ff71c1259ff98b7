"""How natural text reads: its negative log-likelihood per character under an independent character
n-gram model of real reviews (interpolated Kneser-Ney), in nats.

The model is fitted on reviews the generator never trained on (evaluate fits it on the judge's training
set, which it already keeps apart from the generator's data), so a sample scores as likely as real text
only by reading like it. Text that piles up one sentiment's plainest characters, or wanders at a high
temperature, scores far less likely than real reviews; text that repeats one phrase can score likely,
which is why evaluate puts distinct-2 beside it.
"""
import collections
import math

BEGIN, END = "\x02", "\x03"  # a review's boundaries, never characters of a review (ingest strips control bytes)
DISCOUNT = 0.75  # Kneser-Ney's absolute discount, the usual value


class CharNgramModel:
    """Interpolated Kneser-Ney over characters: the highest order counts n-grams, the lower orders count
    the distinct characters each context follows (continuation counts), and below them a uniform
    distribution over the characters seen plus one for any unseen character."""

    def __init__(self, texts, order: int = 4):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        self.order = order
        grams = collections.Counter()
        for text in texts:
            padded = BEGIN * (order - 1) + text + END
            grams.update(padded[i - order:i] for i in range(order, len(padded) + 1))
        if not grams:
            raise ValueError("the n-gram model needs at least one text to fit")
        self.counts = [collections.defaultdict(collections.Counter) for _ in range(order + 1)]  # by n-gram length
        for gram, count in grams.items():
            self.counts[order][gram[:-1]][gram[-1]] += count
        for n in range(order, 1, -1):  # continuation counts: how many distinct characters precede each (n-1)-gram
            for context, following in self.counts[n].items():
                for char in following:
                    self.counts[n - 1][context[1:]][char] += 1
        self.totals = [{context: sum(c.values()) for context, c in level.items()} for level in self.counts]
        self.vocabulary = len(self.counts[1][""]) + 1  # the characters seen, and one for any other

    def probability(self, context: str, char: str) -> float:
        """P(char | the last order-1 characters of context)."""
        p = 1.0 / self.vocabulary
        for n in range(1, self.order + 1):
            history = context[len(context) - (n - 1):] if n > 1 else ""
            total = self.totals[n].get(history)
            if not total:
                continue
            following = self.counts[n][history]
            p = (max(following.get(char, 0) - DISCOUNT, 0.0) + DISCOUNT * len(following) * p) / total
        return p

    def nll_per_char(self, texts, prompt: str = "") -> float:
        """Mean negative log-likelihood, in nats per character, of what each text holds after `prompt` and of
        its end (counted as one character), given what comes before it; texts are whole reviews."""
        nll, chars = 0.0, 0
        for text in texts:
            body = text[len(prompt):] if text.startswith(prompt) else text
            context = BEGIN * (self.order - 1) + text[:len(text) - len(body)]
            for char in body + END:
                nll -= math.log(self.probability(context, char))
                context = context[1:] + char if self.order > 1 else ""
                chars += 1
        return nll / chars if chars else float("nan")
