"""What `evaluate` measures, and the loss train logs.

  nats_per_char   the loss every tokenizer shares: nats per character of held-out reviews given their
                  sentiment, so that char and BPE models, and runs with different vocabularies, compare
                  on one scale
  samples         per prompt and sentiment, the samples' judged sentiment (SentimentJudge), novelty
                  (CopyDetector), distinct-n and length beside the same figures of real held-out reviews
"""
import itertools
import random

import numpy as np
import torch
import torch.nn.functional as F

from .data.tokens import TokenData
from .sample.reviews import write_samples
from .sample.settings import DEFAULTS, SamplingSettings
from .tokenizer import PAD, SENTIMENT_TOKENS

NEAR_COPY_JACCARD = 0.8


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


def distinct_n(texts, n: int) -> float:
    grams = [t[i:i + n] for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def char_ngrams(text: str, n: int = 3) -> frozenset:
    return frozenset(text[i:i + n] for i in range(max(1, len(text) - n + 1)))


class CopyDetector:
    """Finds exact and near-exact copies of training reviews through an index of character 3-grams."""

    def __init__(self, train_texts):
        self.exact = set(train_texts)
        self.grams = [char_ngrams(t) for t in train_texts]
        self.index = {}
        for i, grams in enumerate(self.grams):
            for g in grams:
                self.index.setdefault(g, []).append(i)

    def is_copy(self, text: str) -> bool:
        if text in self.exact:
            return True
        grams = char_ngrams(text)
        shared = {}
        for g in grams:
            for i in self.index.get(g, ()):
                shared[i] = shared.get(i, 0) + 1
        return any(n / (len(grams) + len(self.grams[i]) - n) >= NEAR_COPY_JACCARD for i, n in shared.items())

    def novelty(self, texts) -> float:
        return sum(not self.is_copy(t) for t in texts) / len(texts) if texts else 0.0


class SentimentJudge:
    """Character 1-3-gram TF-IDF + logistic regression: pos/neg of a Chinese review."""

    def __init__(self, reviews):
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
            from sklearn.linear_model import LogisticRegression
        except ImportError:
            raise ValueError("the sentiment judge needs scikit-learn: pip install scikit-learn") from None
        self.vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True)
        features = self.vectorizer.fit_transform([r.text for r in reviews])
        self.classifier = LogisticRegression(max_iter=1000, C=4.0)
        self.classifier.fit(features, [r.sentiment for r in reviews])

    def predict(self, texts):
        return list(self.classifier.predict(self.vectorizer.transform(list(texts)))) if texts else []

    def accuracy(self, reviews) -> float:
        predictions = self.predict([r.text for r in reviews])
        return sum(p == r.sentiment for p, r in zip(predictions, reviews)) / len(reviews)

    def agreement(self, texts, sentiment: str) -> float:
        return sum(p == sentiment for p in self.predict(texts)) / len(texts) if texts else 0.0


@torch.no_grad()
def validation_loss(model, data: TokenData, batch_size: int = 64) -> float:
    """Mean loss over every predicted token of the val split (full rows, or non-overlapping windows)."""
    block = model.config.block_size
    val = data.splits["val"]
    starts = data.layout.covering_positions(val, block)
    device = model.transformer.wte.weight.device
    total, count = 0.0, 0
    for chunk in starts.split(batch_size):
        x, y = data.load_batch("val", chunk, block)
        _, loss = model(x.to(device), y.to(device))
        n = int((y != -1).sum())
        total, count = total + loss.item() * n, count + n
    return total / count


class Reference:
    """What samples are measured against: the judge, the naturalness model (mingpt.naturalness), the training
    reviews of every stage (for copies), and the real held-out reviews."""

    def __init__(self, data: TokenData, judge, naturalness=None, earlier_data=()):
        self.judge, self.naturalness = judge, naturalness
        self.copies = CopyDetector([t for d in (data, *earlier_data) for _, t in d.review_texts("train")])
        self.held_out = data.review_texts("val")
        by_sentiment = {s: [t for label, t in self.held_out if label == s] for s in ("pos", "neg")}
        # the judge's rate and the naturalness of every held-out review of each sentiment: the bars a prompt's
        # samples must reach
        self.real_rates = {s: judge.agreement(texts, s) for s, texts in by_sentiment.items()}
        self.real_naturalness = {s: naturalness.nll_per_char(texts) if naturalness else None
                                 for s, texts in by_sentiment.items()}


def statistics(texts, sentiment, reference: Reference, prompt: str = "") -> dict:
    """The measures of texts; distinct-n counts what follows `prompt` in each."""
    written = [t[len(prompt):] if t.startswith(prompt) else t for t in texts]
    natural = reference.naturalness.nll_per_char(texts, prompt) if reference.naturalness and texts else None
    return {"count": len(texts), "sentiment_accuracy": reference.judge.agreement(texts, sentiment),
            "naturalness": natural,
            "novelty": reference.copies.novelty(texts),
            "exact_copies": sum(t in reference.copies.exact for t in texts) / len(texts) if texts else 0.0,
            "distinct_1": distinct_n(written, 1), "distinct_2": distinct_n(written, 2),
            "mean_length": float(np.mean([len(t) for t in texts])) if texts else 0.0}


def measure_prompts(model, tokenizer, layout, prompts, reference: Reference, settings: SamplingSettings = DEFAULTS,
                    num_samples=50, max_new_tokens=100, seed=0, sampler="auto"):
    """Per (start, sentiment): the samples' statistics beside those of as many real held-out reviews of
    that sentiment (the judged sentiment: of all of them)."""
    rng = random.Random(seed)
    rows = []
    for start, sentiment in prompts:
        samples = write_samples(model, tokenizer, layout, start, sentiment, num_samples, max_new_tokens, settings,
                                seed=seed, sampler=sampler)
        texts = [text for _, text in samples]
        real = [t for s, t in reference.held_out if s == sentiment]
        real = statistics(rng.sample(real, min(len(real), num_samples)), sentiment, reference)
        real["sentiment_accuracy"] = reference.real_rates[sentiment]
        real["naturalness"] = reference.real_naturalness[sentiment]
        generated = statistics(texts, sentiment, reference, prompt=start)
        rows.append({"start": start, "sentiment": sentiment, "generated": generated,
                     "real_held_out": real, "examples": texts[:5]})
    return rows


def summary(measured) -> dict:
    """Every prompt and sentiment of measure_prompts at once: the worst judged-sentiment margin over real
    reviews, the lowest novelty, distinct-2 against real reviews' (mean and lowest), the naturalness gap to
    real reviews (mean, and the one furthest from 0) and the mean length."""
    gen = [m["generated"] for m in measured]
    real = [m["real_held_out"] for m in measured]
    ratios = [g["distinct_2"] / r["distinct_2"] for g, r in zip(gen, real) if r["distinct_2"]]
    gaps = [g["naturalness"] - r["naturalness"] for g, r in zip(gen, real)
            if g["naturalness"] is not None and r["naturalness"] is not None]
    return {"min_sentiment_margin": min(g["sentiment_accuracy"] - r["sentiment_accuracy"] for g, r in zip(gen, real)),
            "mean_sentiment_accuracy": float(np.mean([g["sentiment_accuracy"] for g in gen])),
            "min_novelty": min(g["novelty"] for g in gen),
            "distinct_2_ratio": float(np.mean(ratios)) if ratios else None,
            "min_distinct_2_ratio": min(ratios, default=None),
            "naturalness_gap": float(np.mean(gaps)) if gaps else None,
            "worst_naturalness_gap": max(gaps, key=abs, default=None),
            "mean_length": float(np.mean([g["mean_length"] for g in gen]))}


def sweep(model, tokenizer, layout, prompts, reference: Reference, grid: dict,
          settings: SamplingSettings = DEFAULTS, **options):
    """The summary at every point of grid ({setting name: values}, the rest of `settings` held), with each
    prompt and sentiment's statistics under "pairs". options: measure_prompts'."""
    rows = []
    for values in itertools.product(*grid.values()):
        changes = dict(zip(grid, values))
        measured = measure_prompts(model, tokenizer, layout, prompts, reference, settings.replace(**changes),
                                   **options)
        pairs = [{"start": m["start"], "sentiment": m["sentiment"], "generated": m["generated"],
                  "real_held_out": m["real_held_out"]} for m in measured]
        rows.append({**changes, **summary(measured), "pairs": pairs})
    return rows
