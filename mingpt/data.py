"""Labelled reviews -> `book` / `review` token layouts -> token files; batches.

Token files (in a data directory):
  tokenizer.json      the tokenizer (JSON)
  meta.json           layout, sizes, the seed of the split, the prepare summary
  train.bin, val.bin  uint16 tokens: one stream (book) or rows of block_size+1 (review)
  train_labels.bin, val_labels.bin  review layout: uint8 sentiment of each row (1 positive, 0 negative)
"""
import collections
import json
import os

import numpy as np
import torch

from .corpus import DataError, Review, split_reviews
from .tokenizer import BOS, EOS, PAD, SENTIMENT_TOKENS, SPECIAL_TOKENS, extend_tokenizer, load_tokenizer, train_tokenizer

LAYOUTS = ("review", "book")
LONG_REVIEW_POLICIES = ("split", "truncate", "drop")
BOOK_SEPARATOR = "\n"
# Oversample the minority sentiment by default when it holds less than this share of the rows.
BALANCE_THRESHOLD = 0.35


def review_tokens(review: Review, tokenizer) -> list:
    return ([tokenizer.token_id(BOS), tokenizer.token_id(SENTIMENT_TOKENS[review.sentiment])]
            + tokenizer.encode(review.text) + [tokenizer.token_id(EOS)])


def encode_review_layout(reviews, tokenizer, block_size: int, long_reviews: str, counts):
    """Rows of block_size+1 tokens, one review each, padded with <pad>.

    A review longer than a row is split into consecutive windows (each target predicted once),
    truncated, or dropped, by `long_reviews`; `counts` records how many were.
    """
    if long_reviews not in LONG_REVIEW_POLICIES:
        raise ValueError(f"long_reviews must be one of {LONG_REVIEW_POLICIES}, got {long_reviews!r}")
    row_len, pad = block_size + 1, tokenizer.token_id(PAD)
    rows, labels = [], []
    for review in reviews:
        tokens = review_tokens(review, tokenizer)
        windows = [tokens]
        if len(tokens) > row_len:
            counts[f"long reviews ({long_reviews})"] += 1
            if long_reviews == "drop":
                continue
            if long_reviews == "truncate":
                windows = [tokens[:row_len]]
            else:
                windows = [tokens[start:start + row_len] for start in range(0, len(tokens) - 1, block_size)]
        rows += [window + [pad] * (row_len - len(window)) for window in windows]
        labels += [int(review.sentiment == "pos")] * len(windows)
    return np.array(rows, dtype=np.uint16).reshape(-1, row_len), np.array(labels, dtype=np.uint8)


def encode_book_layout(reviews, tokenizer):
    """One stream: each review as <sentiment> text, ended by a newline."""
    separator = tokenizer.encode(BOOK_SEPARATOR)
    stream = []
    for review in reviews:
        stream.append(tokenizer.token_id(SENTIMENT_TOKENS[review.sentiment]))
        stream.extend(tokenizer.encode(review.text))
        stream.extend(separator)
    return np.array(stream, dtype=np.uint16)


def prepare(reviews, drops, data_dir, layout="review", block_size=64, long_reviews="split",
            val_fraction=0.1, seed=1337, source="", tokenizer="char", bpe_vocab_size=2000, base_tokenizer=None):
    """Write tokenizer.json, meta.json and the token files; returns the meta dict.

    `base_tokenizer` (a tokenizer of an earlier run) keeps its ids and adds what the reviews need,
    so a checkpoint trained with it can be fine-tuned on this data.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    kept = [r for r in reviews if not any(t in r.text for t in SPECIAL_TOKENS)]
    if len(kept) < len(reviews):
        drops["holds a special-token string such as <eos>"] += len(reviews) - len(kept)
        reviews = kept
    if not reviews:
        raise DataError(f"no usable reviews in {source or 'the input'} (dropped: {dict(drops)})")
    texts = [r.text for r in reviews] + ([BOOK_SEPARATOR] if layout == "book" else [])
    if base_tokenizer is not None:
        tokenizer = extend_tokenizer(base_tokenizer, texts)
    else:
        tokenizer = train_tokenizer(tokenizer, texts, bpe_vocab_size)
    train, val = split_reviews(reviews, val_fraction, seed)
    os.makedirs(data_dir, exist_ok=True)
    layout_counts = collections.Counter()
    splits = {}
    for name, part in (("train", train), ("val", val)):
        if layout == "review":
            tokens, labels = encode_review_layout(part, tokenizer, block_size, long_reviews, layout_counts)
            labels.tofile(os.path.join(data_dir, f"{name}_labels.bin"))
        else:
            tokens = encode_book_layout(part, tokenizer)
        tokens.tofile(os.path.join(data_dir, f"{name}.bin"))
        splits[name] = {"reviews": len(part), "tokens": int(tokens.size),
                        "positive": sum(r.sentiment == "pos" for r in part)}
    if layout == "book" and splits["val"]["tokens"] <= block_size:
        raise DataError(f"the val split holds {splits['val']['tokens']} tokens, fewer than "
                        f"block_size+1={block_size + 1}: use more data or a smaller block")
    tokenizer.save(os.path.join(data_dir, "tokenizer.json"))
    n_pos = sum(r.sentiment == "pos" for r in reviews)
    meta = {
        "layout": layout, "block_size": block_size, "row_len": block_size + 1 if layout == "review" else None,
        "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.kind, "seed": seed,
        "val_fraction": val_fraction, "source": source, "long_reviews": long_reviews,
        "eos_token": EOS if layout == "review" else BOOK_SEPARATOR,
        "reviews": len(reviews), "positive": n_pos, "negative": len(reviews) - n_pos,
        "base_vocab_size": base_tokenizer.vocab_size if base_tokenizer is not None else None,
        "dropped": dict(drops), "layout_counts": dict(layout_counts), "splits": splits,
    }
    with open(os.path.join(data_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=2)
    return meta


def summary_line(meta) -> str:
    dropped = sum(meta["dropped"].values())
    why = ", ".join(f"{n:,} {reason}" for reason, n in sorted(meta["dropped"].items())) or "none"
    long_ = ", ".join(f"{n:,} {k}" for k, n in meta["layout_counts"].items())
    s = meta["splits"]
    return (f"{meta['source']}: kept {meta['reviews']:,} reviews, dropped {dropped:,} ({why}); "
            f"labels {meta['positive']:,} positive / {meta['negative']:,} negative "
            f"({100 * meta['positive'] / meta['reviews']:.0f}% positive); vocab {meta['vocab_size']:,}; "
            f"layout {meta['layout']}{' (' + long_ + ')' if long_ else ''}; "
            f"train {s['train']['tokens']:,} tokens ({s['train']['reviews']:,} reviews), "
            f"val {s['val']['tokens']:,} tokens ({s['val']['reviews']:,} reviews)"
            + (f"; minority sentiment under {BALANCE_THRESHOLD:.0%}: train oversamples it (--balance auto)"
               if meta["layout"] == "review" and min(meta["positive"], meta["negative"]) < BALANCE_THRESHOLD * meta["reviews"]
               else ""))


class TokenData:
    """The token files of a data directory, and random batches from them."""

    def __init__(self, data_dir: str):
        meta_path = os.path.join(data_dir, "meta.json")
        try:
            with open(meta_path, encoding="utf-8") as f:
                self.meta = json.load(f)
        except FileNotFoundError:
            raise DataError(f"no prepared data in {data_dir} (missing meta.json): "
                            f"run `python -m mingpt.prepare --data_dir {data_dir}` first") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_path} is not valid JSON: {e}") from None
        self.data_dir = data_dir
        self.tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
        if self.tokenizer.vocab_size != self.meta["vocab_size"]:
            raise DataError(f"{data_dir}: tokenizer.json has {self.tokenizer.vocab_size} tokens but "
                            f"meta.json says {self.meta['vocab_size']}; prepare the data again")
        self.layout = self.meta["layout"]
        self.splits = {name: self._load_split(name) for name in ("train", "val")}
        self.class_rows = None

    def _load_split(self, name):
        path = os.path.join(self.data_dir, f"{name}.bin")
        if not os.path.isfile(path):
            raise DataError(f"missing token file {path}; prepare the data again")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if tokens.size and int(tokens.max()) >= self.tokenizer.vocab_size:
            raise DataError(f"{path} holds token ids beyond the vocabulary of {self.tokenizer.vocab_size}; "
                            "it was prepared with another tokenizer")
        if self.layout == "review":
            row_len = self.meta["row_len"]
            if tokens.size % row_len:
                raise DataError(f"{path} is truncated: {tokens.size} tokens is no multiple of rows of {row_len}")
            return tokens.reshape(-1, row_len)
        return tokens

    def row_labels(self, split: str):
        """uint8 sentiment of each row (1 positive, 0 negative); review layout only."""
        path = os.path.join(self.data_dir, f"{split}_labels.bin")
        labels = np.fromfile(path, dtype=np.uint8) if os.path.isfile(path) else None
        if labels is None or len(labels) != len(self.splits[split]):
            raise DataError(f"{path} is missing or does not match {split}.bin; prepare the data again")
        return labels

    def set_balance(self, mode: str) -> str:
        """Oversample the minority sentiment in training batches: mode on, off or auto; says what it did."""
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"balance must be auto, on or off, got {mode!r}")
        if self.layout != "review":
            if mode == "on":
                raise DataError("--balance on needs the review layout (rows with one sentiment each)")
            self.class_rows = None
            return "class balance: off (book layout)"
        labels = self.row_labels("train")
        share = float(labels.mean()) if len(labels) else 0.5
        minority = min(share, 1 - share)
        if mode == "off" or (mode == "auto" and minority >= BALANCE_THRESHOLD):
            self.class_rows = None
            return f"class balance: off ({share:.0%} of training rows positive)"
        self.class_rows = [torch.from_numpy(np.flatnonzero(labels == c)) for c in (0, 1)]
        if any(len(rows) == 0 for rows in self.class_rows):
            raise DataError("cannot balance: the training rows hold only one sentiment")
        return (f"class balance: on ({share:.0%} of training rows positive; batches drawn 50/50 "
                f"by oversampling the {'negative' if share > 0.5 else 'positive'} rows)")

    def review_texts(self, split: str):
        """The (sentiment, text) of every review in a split, decoded from the token files."""
        tok, data = self.tokenizer, self.splits[split]
        if self.layout == "book":
            names = {tok.token_id(t): name for name, t in SENTIMENT_TOKENS.items()}
            out, current = [], None
            for token in np.asarray(data).tolist():
                if token in names:
                    current = (names[token], [])
                    out.append(current)
                elif current is not None:
                    current[1].append(token)
            return [(name, tok.decode(ids).strip()) for name, ids in out]
        bos, eos, pos = tok.token_id(BOS), tok.token_id(EOS), tok.token_id(SENTIMENT_TOKENS["pos"])
        reviews = []
        for row in np.asarray(data).tolist():
            if row[0] == bos:
                reviews.append(("pos" if row[1] == pos else "neg", row[2:]))
            elif reviews:
                reviews[-1][1].extend(row[1:])  # a later window of a split review: its first token overlaps
        return [(name, tok.decode(ids[:ids.index(eos)] if eos in ids else ids)) for name, ids in reviews]

    def check_block_size(self, block_size: int):
        if self.layout == "review" and self.meta["block_size"] > block_size:
            raise DataError(f"{self.data_dir} was prepared with rows for block_size {self.meta['block_size']}, "
                            f"longer than the model's block_size {block_size}: prepare again with "
                            f"--block_size {block_size}")

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_id(self.meta["eos_token"])

    def sample_positions(self, split: str, batch_size: int, block_size: int, generator: torch.Generator):
        """Random rows (review layout) or window starts (book layout) for one batch."""
        data = self.splits[split]
        if self.layout == "review" and split == "train" and self.class_rows is not None:
            classes = torch.randint(2, (batch_size,), generator=generator)
            picks = torch.rand(batch_size, generator=generator)
            return torch.stack([self.class_rows[c][int(u * len(self.class_rows[c]))]
                                for c, u in zip(classes.tolist(), picks.tolist())])
        if self.layout == "review":
            return torch.randint(len(data), (batch_size,), generator=generator)
        return torch.randint(len(data) - self._window(split, block_size), (batch_size,), generator=generator)

    def _window(self, split: str, block_size: int) -> int:
        return min(block_size, len(self.splits[split]) - 1)

    def load_batch(self, split: str, positions, block_size: int):
        """Inputs and targets (-1 where there is nothing to predict) at the given positions."""
        data = self.splits[split]
        if self.layout == "review":
            chunk = torch.from_numpy(data[positions.numpy()].astype(np.int64))
            x, y = chunk[:, :-1].clone(), chunk[:, 1:].clone()
            y[y == self.tokenizer.token_id(PAD)] = -1
            return x, y
        T = self._window(split, block_size)
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in positions.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in positions.tolist()])
        return x, y

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator):
        return self.load_batch(split, self.sample_positions(split, batch_size, block_size, generator), block_size)
