"""Measure a checkpoint: `python -m mingpt.evaluate --ckpt out/seed --data_dir data/movies`.

Reports validation loss and perplexity, and the loss every tokenizer shares: nats per character of
the held-out reviews given their sentiment (each review's characters and end token given the
context and sentiment tokens), then writes N samples per prompt and sentiment (by default
好看, 难看 and six prompts that carry no sentiment, each asked for both sentiments, at the sample
CLI's default settings) and measures them beside real held-out reviews of the same sentiment:
  sentiment accuracy  share judged to have the asked sentiment by an independent classifier
                      (character 1-3-gram TF-IDF + logistic regression) trained on a labelled set the
                      generator did not train on; the judge's own accuracy on a test set is reported
  novelty             share of samples that copy no training review: neither equal to one nor
                      near-equal (Jaccard similarity of character 3-gram sets >= 0.8); reviews of
                      earlier stages (--pretrained_on) count as training reviews too
  exact copies        share of samples equal to a training review
  distinct-1/2        unique character uni/bigrams over all uni/bigrams of what the model wrote: the
                      samples after their prompt (every sample repeats the prompt, which no set of real
                      reviews does), the real reviews whole
  naturalness         negative log-likelihood per character under an independent character n-gram model
                      of real reviews (mingpt.naturalness), fitted on the judge's training set: how likely
                      the text reads as a real review; the samples' (after their prompt) beside the real
                      held-out reviews' of that sentiment
With --sweep NAME=V1,V2 (repeatable, any sampling setting) it prints the summary over that grid instead.
"""
import argparse
import json
import math
import os
import random
import sys

from .checkpoint import CheckpointError, load
from .data.corpus import EMBEDDED_CORPUS, DataError, load_csv, load_embedded_corpus
from .data.tokens import TokenData
from .metrics import Reference, SentimentJudge, measure_prompts, nats_per_char, sweep, validation_loss
from .naturalness import CharNgramModel
from .sample.engine import SAMPLERS
from .sample.settings import DEFAULTS, FIELDS, add_flags, from_args

# 好看 and 难看, then prompts that carry no sentiment of their own: subjects and opening phrases.
NEUTRAL_PROMPTS = ("这部电影", "剧情", "演员", "导演", "我觉得", "看完之后")
DEFAULT_PROMPTS = ",".join(("好看", "难看") + NEUTRAL_PROMPTS)
DEFAULT_JUDGE_TRAIN = os.path.join("..", "shared", "data", "douban_comments_train.csv")
DEFAULT_JUDGE_TEST = os.path.join("..", "shared", "data", "douban_comments_test.csv")


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
        name = EMBEDDED_CORPUS
    if test_path and os.path.isfile(test_path):
        test, _ = load_csv(test_path)
        return train, test, name, test_path
    random.Random(0).shuffle(train)
    cut = len(train) // 10
    return train[cut:], train[:cut], name, f"10% held out of {name}"


def evaluate(model, tokenizer, data: TokenData, layout, prompts, reference: Reference, settings, **options):
    """The report as a dict: val loss, then per prompt the generated vs real held-out statistics
    (options: measure_prompts')."""
    val_loss = validation_loss(model, data)
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss),
            "val_nats_per_char": nats_per_char(model, tokenizer, layout, reference.held_out),
            "prompts": measure_prompts(model, tokenizer, layout, prompts, reference, settings, **options)}


def print_report(report, file=sys.stdout):
    print(f"judge: trained on {report['judge']['train']}, accuracy {report['judge']['test_accuracy']:.1%} "
          f"on {report['judge']['test']}; naturalness: nats per character under a {report['judge']['naturalness']}",
          file=file)
    print(f"validation loss {report['val_loss']:.4f}, perplexity {report['perplexity']:.1f}; "
          f"{report['val_nats_per_char']:.4f} nats per character given the sentiment", file=file)
    print(f"{'prompt':<16}{'metric':<20}{'generated':>10}{'real':>10}{'difference':>12}", file=file)
    for p in report["prompts"]:
        label = f"{p['start']} ({p['sentiment']})"
        for metric in ("sentiment_accuracy", "naturalness", "novelty", "exact_copies", "distinct_1", "distinct_2",
                       "mean_length"):
            g, r = p["generated"][metric], p["real_held_out"][metric]
            if g is None or r is None:
                continue
            if metric in ("mean_length", "naturalness"):
                cells = f"{g:>10.2f}{r:>10.2f}{g - r:>+12.2f}"
            else:
                cells = f"{g:>10.1%}{r:>10.1%}{100 * (g - r):>+10.1f}pp"
            print(f"{label:<16}{metric:<20}{cells}", file=file)
            label = ""


SWEEP_COLUMNS = (("min sentiment margin", "min_sentiment_margin", "{:+.1%}"),
                 ("mean sentiment", "mean_sentiment_accuracy", "{:.1%}"), ("min novelty", "min_novelty", "{:.1%}"),
                 ("distinct-2 / real", "distinct_2_ratio", "{:.2f}"), ("lowest", "min_distinct_2_ratio", "{:.2f}"),
                 ("naturalness gap", "naturalness_gap", "{:+.2f}"), ("worst", "worst_naturalness_gap", "{:+.2f}"),
                 ("mean length", "mean_length", "{:.1f}"))


def print_sweep(rows, swept, file=sys.stdout):
    """One line per point of the grid: the swept settings, then the summary (mingpt.metrics.summary)."""
    widths = [max(12, len(name)) + 2 for name in swept]
    print("".join(f"{name:>{w}}" for name, w in zip(swept, widths))
          + "".join(f"{title:>22}" for title, _, _ in SWEEP_COLUMNS), file=file)
    for r in rows:
        print("".join(f"{r[name]!s:>{w}}" for name, w in zip(swept, widths))
              + "".join(f"{'-' if r[key] is None else form.format(r[key]):>22}" for _, key, form in SWEEP_COLUMNS),
              file=file)


def parse_prompts(text: str, tokenizer=None):
    """Comma-separated START (asked for both sentiments) or START:pos / START:neg; with a tokenizer,
    a character outside its vocabulary is an error naming the prompt."""
    prompts = []
    for item in text.split(","):
        start, colon, sentiment = item.partition(":")
        if colon and sentiment not in ("pos", "neg"):
            raise ValueError(f"prompt {item!r}: write START, START:pos or START:neg")
        if tokenizer is not None:
            try:
                tokenizer.encode(start)
            except ValueError as e:
                raise ValueError(f"prompt {start!r}: {e}; choose prompts with --prompts") from None
        prompts.extend([(start, sentiment)] if colon else [(start, "pos"), (start, "neg")])
    return prompts


def parse_sweep(items) -> dict:
    """--sweep NAME=V1,V2 items as {setting name: [values]}, each value of the setting's type."""
    grid = {}
    for item in items:
        name, equals, values = item.partition("=")
        if not equals or name not in FIELDS or name == "stop":
            raise ValueError(f"--sweep {item!r}: write NAME=V1,V2,... with NAME a sampling setting other than stop "
                             f"({', '.join(n for n in FIELDS if n != 'stop')})")
        kind = type(getattr(DEFAULTS, name))
        try:
            grid[name] = [kind(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--sweep {item!r}: {name} takes {kind.__name__} values") from None
    return grid


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mingpt.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out", help="checkpoint file or directory")
    p.add_argument("--data_dir", required=True, help="the prepared data the checkpoint trained on (val split, "
                                                     "training reviews for novelty, real held-out reviews)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help="comma-separated START (both sentiments) or START:pos / START:neg (default: 好看, 难看 "
                        "and six prompts that carry no sentiment, each for both)")
    p.add_argument("--num_samples", type=int, default=50, help="samples per prompt and sentiment")
    p.add_argument("--max_new_tokens", type=int, default=100)
    add_flags(p)  # the sample CLI's defaults: what a user who types only --start gets
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=SAMPLERS, default="auto", help="decode loop (as sample's)")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                   help="measure every combination of these values of sampling settings (repeatable; the other "
                        "settings as given) and print one summary line for each instead of the report")
    p.add_argument("--judge_train", default=DEFAULT_JUDGE_TRAIN,
                   help="labelled CSV the judge trains on (default: the 20k Douban comments when present, "
                        "else the embedded corpus)")
    p.add_argument("--judge_test", default=DEFAULT_JUDGE_TEST, help="labelled CSV the judge is scored on")
    p.add_argument("--pretrained_on", action="append", default=[], metavar="DATA_DIR",
                   help="prepared data of an earlier stage (train --init_from; repeatable): its training "
                        "reviews count for novelty and the judge may not train on its source")
    p.add_argument("--json", help="also write the report to this JSON file")
    return p


def run(args):
    """The report (or, with --sweep, the sweep's rows) for parsed arguments."""
    grid = parse_sweep(args.sweep)
    loaded = load(args.ckpt)
    model, tokenizer, layout = loaded.model, loaded.tokenizer, loaded.layout
    data = TokenData(args.data_dir)
    if data.tokenizer.to_dict() != tokenizer.to_dict():
        raise DataError(f"{args.data_dir} was prepared with another tokenizer than {args.ckpt}")
    prompts = parse_prompts(args.prompts, tokenizer)
    earlier = [TokenData(d) for d in args.pretrained_on]
    sources = ([loaded.data.get("source"), (loaded.data.get("extra_train") or {}).get("source")]
               + [d.meta.get("source") for d in earlier])
    judge_train, judge_test, train_name, test_name = load_judge_sets(args.judge_train, args.judge_test, sources)
    naturalness = CharNgramModel(r.text for r in judge_train)
    reference = Reference(data, SentimentJudge(judge_train), naturalness, earlier)
    options = dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, seed=args.seed,
                   sampler=args.sampler)
    judge = {"train": train_name, "test": test_name, "test_accuracy": reference.judge.accuracy(judge_test),
             "naturalness": f"character {naturalness.order}-gram model (Kneser-Ney) of {train_name}"}
    if grid:
        return {"judge": judge, "sweep": sweep(model, tokenizer, layout, prompts, reference, grid, from_args(args),
                                               **options)}
    report = evaluate(model, tokenizer, data, layout, prompts, reference, from_args(args), **options)
    report["judge"] = judge
    return report


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from_args(args, parser)
    try:
        report = run(args)
    except (CheckpointError, DataError, ValueError, RuntimeError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if "sweep" in report:
        print_sweep(report["sweep"], list(parse_sweep(args.sweep)))
    else:
        print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
