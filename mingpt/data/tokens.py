"""Token files and batches at run time: write a data directory from labelled reviews, read it back.

Token files (in a data directory):
  tokenizer.json      the tokenizer (JSON)
  meta.json           layout name, sizes, the seed of the split, the prepare summary
  train.bin, val.bin  uint16 tokens, shaped by the layout (mingpt.data.layouts)
  train_labels.bin, val_labels.bin  review layout: uint8 sentiment of each row (1 positive, 0 negative)
  train_sources.bin   with extra training reviews: uint8 of each train row (0 the source's own, 1 extra)
"""
import collections
import json
import os

import numpy as np
import torch

from .corpus import UNESCAPED, DataError, split_reviews
from .layouts import get_layout
from .packing import ReviewPacker, load_packed
from ..tokenizer import (BOS, EXTRA_BOS, PAD, RESERVED_STRINGS, extend_tokenizer, load_tokenizer,
                        train_tokenizer)

# Oversample the minority sentiment by default when it holds less than this share of the rows.
BALANCE_THRESHOLD = 0.35


class PassOrder:
    """Rows drawn without replacement: each once a pass, in a fresh random order every pass."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows
        self.order = rows[:0]
        self.taken = 0

    def take(self, generator: torch.Generator) -> int:
        if self.taken == len(self.order):
            self.order = self.rows[torch.randperm(len(self.rows), generator=generator)]
            self.taken = 0
        self.taken += 1
        return int(self.order[self.taken - 1])


def write_data_dir(reviews, drops, data_dir, layout="review", block_size=64, long_reviews="split",
            val_fraction=0.1, seed=1337, source="", tokenizer="char", bpe_vocab_size=2000, base_tokenizer=None,
            read_as=None, extra_train=(), extra_source=""):
    """Write tokenizer.json, meta.json and the token files; returns the meta dict.

    `read_as` says how the source file was read (format and encoding, e.g. "CSV, GB18030").
    `base_tokenizer` (a tokenizer of an earlier run) keeps its ids and adds what the reviews need,
    so a checkpoint trained with it can be fine-tuned on this data.
    `extra_train` (review layout): reviews of another source (`extra_source`) added to the train split
    only, after the rows of `reviews`, and marked in train_sources.bin; the val split and the label
    counts stay those of `reviews`. An extra review whose text is a held-out review is left out. A new
    tokenizer holds EXTRA_BOS, which begins the extra reviews in place of <bos>.
    """
    layout = get_layout(layout)
    drops = collections.Counter(drops)
    unescaped = drops.pop(UNESCAPED, 0)
    kept = [r for r in reviews if not any(t in r.text for t in RESERVED_STRINGS)]
    if len(kept) < len(reviews):
        drops["holds a special-token string such as <eos>"] += len(reviews) - len(kept)
        reviews = kept
    if not reviews:
        raise DataError(f"no usable reviews in {source or 'the input'} (dropped: {dict(drops)})")
    if extra_train and not layout.balances_classes:
        raise DataError(f"extra training reviews need the review layout, not {layout.name}")
    texts = [r.text for r in reviews] + [r.text for r in extra_train] + list(layout.separator_texts)
    if base_tokenizer is not None:
        tokenizer = extend_tokenizer(base_tokenizer, texts)
    else:
        tokenizer = train_tokenizer(tokenizer, texts, bpe_vocab_size, extra_bos=bool(extra_train))
    train, val = split_reviews(reviews, val_fraction, seed)
    held_out = {r.text for r in val}
    extra = [r for r in extra_train if r.text not in held_out and not any(t in r.text for t in RESERVED_STRINGS)]
    os.makedirs(data_dir, exist_ok=True)
    layout_counts = collections.Counter()
    splits = write_splits(layout, {"train": train, "val": val}, extra, tokenizer, block_size, long_reviews, data_dir,
                          layout_counts)
    tokenizer.save(os.path.join(data_dir, "tokenizer.json"))
    n_pos = sum(r.sentiment == "pos" for r in reviews)
    meta = {
        "layout": layout.name, "block_size": block_size, "row_len": layout.row_len(block_size),
        "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.kind, "seed": seed,
        "val_fraction": val_fraction, "source": source, "read_as": read_as, "long_reviews": long_reviews,
        "eos_token": layout.end_token,
        "reviews": len(reviews), "positive": n_pos, "negative": len(reviews) - n_pos,
        "base_vocab_size": base_tokenizer.vocab_size if base_tokenizer is not None else None,
        "dropped": dict(drops), "unescaped": unescaped, "layout_counts": dict(layout_counts), "splits": splits,
        "extra_train": {"source": extra_source, "reviews": len(extra)} if extra else None,
    }
    with open(os.path.join(data_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=2)
    return meta


def write_splits(layout, parts: dict, extra, tokenizer, block_size: int, long_reviews: str, data_dir: str,
                 layout_counts) -> dict:
    """{split: its sizes} after writing each split's token files (train with the extra reviews after its own)."""
    splits, pad = {}, tokenizer.token_id(PAD)
    for name, part in parts.items():
        tokens, labels = layout.encode(part, tokenizer, block_size, long_reviews, layout_counts)
        splits[name] = {"reviews": len(part), "tokens": int((tokens != pad).sum()),
                        "positive": sum(r.sentiment == "pos" for r in part)}
        if name == "train" and extra:
            extra_rows = encode_extra(layout, extra, tokenizer, block_size, long_reviews)
            splits[name]["extra_tokens"] = int((extra_rows[0] != pad).sum())
            tokens, labels = add_extra_rows(tokens, labels, extra_rows, data_dir)
        if labels is not None:
            labels.tofile(os.path.join(data_dir, f"{name}_labels.bin"))
        tokens.tofile(os.path.join(data_dir, f"{name}.bin"))
    layout.check_val_size(splits["val"]["tokens"], block_size)
    return splits


def encode_extra(layout, extra, tokenizer, block_size: int, long_reviews: str):
    """The (tokens, labels) of the extra training reviews, each begun by EXTRA_BOS where the tokenizer holds it."""
    context = EXTRA_BOS if EXTRA_BOS in tokenizer.special_tokens else BOS
    return layout.encode(extra, tokenizer, block_size, long_reviews, collections.Counter(), context_token=context)


def add_extra_rows(tokens, labels, extra, data_dir):
    """The train rows and labels with the extra reviews' (tokens, labels) after them; writes train_sources.bin."""
    sources = np.concatenate([np.zeros(len(tokens), np.uint8), np.ones(len(extra[0]), np.uint8)])
    sources.tofile(os.path.join(data_dir, "train_sources.bin"))
    return np.concatenate([tokens, extra[0]]), np.concatenate([labels, extra[1]])


def summary_line(meta) -> str:
    dropped = sum(meta["dropped"].values())
    why = ", ".join(f"{n:,} {reason}" for reason, n in sorted(meta["dropped"].items())) or "none"
    long_ = ", ".join(f"{n:,} {k}" for k, n in meta["layout_counts"].items())
    s = meta["splits"]
    read_as = f" (read as {meta['read_as']})" if meta.get("read_as") else ""
    extra = meta.get("extra_train")
    extra_tokens = f" ({s['train']['extra_tokens']:,} tokens)" if "extra_tokens" in s["train"] else ""
    extra = f"; train adds {extra['reviews']:,} reviews{extra_tokens} of {extra['source']}" if extra else ""
    unescaped = f"; {meta['unescaped']:,} rows' HTML entities unescaped" if meta.get("unescaped") else ""
    return (f"{meta['source']}{read_as}: kept {meta['reviews']:,} reviews, dropped {dropped:,} ({why}){unescaped}; "
            f"labels {meta['positive']:,} positive / {meta['negative']:,} negative "
            f"({100 * meta['positive'] / meta['reviews']:.0f}% positive); vocab {meta['vocab_size']:,}; "
            f"layout {meta['layout']}{' (' + long_ + ')' if long_ else ''}; "
            f"train {s['train']['tokens']:,} tokens ({s['train']['reviews']:,} reviews), "
            f"val {s['val']['tokens']:,} tokens ({s['val']['reviews']:,} reviews)"
            + extra)


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
        try:
            self.layout = get_layout(self.meta["layout"])
        except ValueError as e:
            raise DataError(f"{meta_path}: {e}") from None
        self.splits = {name: self._load_split(name) for name in ("train", "val")}
        self.sources = self._load_sources()
        self.class_rows = None
        self.packer = None
        self.pass_orders = None  # [source][sentiment] -> PassOrder, with set_reshuffle
        self.extra_share = 0.0  # the share of training draws from the extra reviews (set_extra_share)

    def _load_split(self, name):
        path = os.path.join(self.data_dir, f"{name}.bin")
        if not os.path.isfile(path):
            raise DataError(f"missing token file {path}; prepare the data again")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if tokens.size and int(tokens.max()) >= self.tokenizer.vocab_size:
            raise DataError(f"{path} holds token ids beyond the vocabulary of {self.tokenizer.vocab_size}; "
                            "it was prepared with another tokenizer")
        return self.layout.shape_tokens(tokens, self.meta["row_len"], path)

    def _load_sources(self):
        """The source of each train row (0 the data's own, 1 extra), or None without extra reviews."""
        if not self.meta.get("extra_train"):
            return None
        path = os.path.join(self.data_dir, "train_sources.bin")
        sources = np.fromfile(path, dtype=np.uint8) if os.path.isfile(path) else None
        if sources is None or len(sources) != len(self.splits["train"]):
            raise DataError(f"{path} is missing or does not match train.bin; prepare the data again")
        self.source_rows = [torch.from_numpy(np.flatnonzero(sources == source)) for source in (0, 1)]
        return sources

    def set_extra_share(self, share: float):
        """Draw this share of training reviews from the extra reviews (0: only the data's own)."""
        if share and self.sources is None:
            raise DataError(f"{self.data_dir} holds no extra training reviews to draw a share of")
        if not 0.0 <= share < 1.0:
            raise ValueError(f"the share of extra training reviews must be in [0, 1), got {share}")
        self.extra_share = share

    def row_labels(self, split: str):
        """uint8 sentiment of each row (1 positive, 0 negative); layouts that balance classes only."""
        path = os.path.join(self.data_dir, f"{split}_labels.bin")
        labels = np.fromfile(path, dtype=np.uint8) if os.path.isfile(path) else None
        if labels is None or len(labels) != len(self.splits[split]):
            raise DataError(f"{path} is missing or does not match {split}.bin; prepare the data again")
        return labels

    def set_balance(self, mode: str) -> str:
        """Oversample the minority sentiment in training batches: mode on, off or auto; says what it did."""
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"balance must be auto, on or off, got {mode!r}")
        if not self.layout.balances_classes:
            if mode == "on":
                raise DataError("--balance on needs the review layout (rows with one sentiment each)")
            self.class_rows = None
            return f"class balance: off ({self.layout.name} layout)"
        labels = self.row_labels("train")
        own = labels if self.sources is None else labels[self.sources == 0]
        share = float(own.mean()) if len(own) else 0.5
        minority = min(share, 1 - share)
        if mode == "off":
            self.class_rows = None
            return f"class balance: off (--balance off: {share:.0%} of training rows positive, drawn as they come)"
        if mode == "auto" and minority >= BALANCE_THRESHOLD:
            self.class_rows = None
            return (f"class balance: off ({share:.0%} of training rows positive; --balance auto oversamples a "
                    f"minority under {BALANCE_THRESHOLD:.0%})")
        sources = np.zeros(len(labels), np.uint8) if self.sources is None else self.sources
        self.class_rows = [[torch.from_numpy(np.flatnonzero((labels == c) & (sources == source))) for c in (0, 1)]
                           for source in range(int(sources.max()) + 1)]
        if any(len(rows) == 0 for rows in self.class_rows[0]):
            raise DataError("cannot balance: the training rows hold only one sentiment")
        return (f"class balance: on ({share:.0%} of training rows positive; batches drawn 50/50 "
                f"by oversampling the {'negative' if share > 0.5 else 'positive'} rows)")

    def set_packing(self, on: bool):
        """Pack several reviews into each training row (mingpt.data.packing); the review layout only."""
        if on and not self.layout.balances_classes:
            raise DataError(f"--pack needs the review layout (whole reviews to pack), not {self.layout.name}")
        self.packer = ReviewPacker(self.splits["train"], self.pad_id) if on else None

    def set_reshuffle(self, on: bool):
        """Draw training rows without replacement within each group (source, and sentiment when balancing):
        every row once a pass, reshuffled each pass; the review layout only, after set_balance."""
        if on and not self.layout.balances_classes:
            raise DataError(f"--reshuffle needs the review layout (a review a row), not {self.layout.name}")
        orders = {}  # one PassOrder per group of rows: both sentiments share one when not balancing
        self.pass_orders = [[orders.setdefault(id(rows), PassOrder(rows)) for rows in pair]
                            for pair in self._row_groups()] if on else None

    def _row_groups(self) -> list:
        """The training rows drawn from, [source][sentiment]: by sentiment when balancing, else one group a source."""
        if self.class_rows is not None:
            return self.class_rows
        by_source = self.source_rows if self.sources is not None else [torch.arange(len(self.splits["train"]))]
        return [[rows, rows] for rows in by_source]

    def pass_order_state(self) -> list:
        """Where each group's pass stands, for a checkpoint: (order, taken) per source and sentiment."""
        return [[(order.order, order.taken) for order in pair] for pair in self.pass_orders or []]

    def restore_pass_order_state(self, state: list):
        """Continue each group's pass where a checkpoint left it (a checkpoint without them: new passes)."""
        if not state or self.pass_orders is None:
            return
        if len(state) != len(self.pass_orders):
            raise DataError(f"the checkpoint's reshuffled rows come from {len(state)} source(s), this run draws "
                            f"from {len(self.pass_orders)}")
        for pair, saved_pair in zip(self.pass_orders, state):
            for order, (saved, taken) in zip(pair, saved_pair):
                order.order, order.taken = saved, taken  # a PassOrder both sentiments share gets the same twice

    @property
    def pad_id(self) -> int:
        return self.tokenizer.token_id(PAD)

    def plan_packed_batch(self, batch_size: int, generator: torch.Generator) -> list:
        """The training rows of each packed row of one batch (set_packing first)."""
        return self.packer.plan(batch_size, lambda n: self.sample_positions("train", n, None, generator))

    def load_packed_batch(self, plan):
        """Inputs, targets and review starts of a planned packed batch."""
        return load_packed(self.splits["train"], plan, self.pad_id)

    def review_texts(self, split: str):
        """The (sentiment, text) of every review in a split, decoded from the token files."""
        return self.layout.decode_reviews(self.splits[split], self.tokenizer)

    def check_block_size(self, block_size: int):
        if not self.layout.fits_block_size(self.meta["block_size"], block_size):
            raise DataError(f"{self.data_dir} was prepared with rows for block_size {self.meta['block_size']}, "
                            f"longer than the model's block_size {block_size}: prepare again with "
                            f"--block_size {block_size}")

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_id(self.layout.end_token)

    def sample_positions(self, split: str, batch_size: int, block_size: int, generator: torch.Generator):
        """Positions of one batch: drawn by the layout, or 50/50 by sentiment when training is balanced, a
        share extra_share of them from the extra reviews; each group's rows in pass order with set_reshuffle."""
        if split != "train" or (self.class_rows is None and self.sources is None and self.pass_orders is None):
            return self.layout.sample_positions(self.splits[split], batch_size, block_size, generator)
        sources = ((torch.rand(batch_size, generator=generator) < self.extra_share).long() if self.extra_share
                   else torch.zeros(batch_size, dtype=torch.long))
        classes = torch.randint(2, (batch_size,), generator=generator)
        if self.pass_orders is not None:
            return torch.tensor([self.pass_orders[source][c].take(generator)
                                 for source, c in zip(sources.tolist(), classes.tolist())])
        picks = torch.rand(batch_size, generator=generator)
        groups = self._row_groups()
        chosen = [groups[source][c] for source, c in zip(sources.tolist(), classes.tolist())]
        return torch.stack([rows[int(u * len(rows))] for rows, u in zip(chosen, picks.tolist())])

    def load_batch(self, split: str, positions, block_size: int):
        """Inputs and targets (-1 where there is nothing to predict) at the given positions."""
        return self.layout.load_batch(self.splits[split], positions, block_size, self.tokenizer)

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator):
        return self.load_batch(split, self.sample_positions(split, batch_size, block_size, generator), block_size)
