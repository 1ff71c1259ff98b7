"""The two ways labelled reviews become token files, as objects chosen by name (meta.json keeps the name).

- `review`: each review is its own row of block_size+1 tokens, `<bos> <pos|neg> text <eos>` padded
  with <pad>, and each row has a sentiment label; a batch is whole rows.
- `book`: all reviews as one stream, each `<pos|neg> text` and a line break; a batch is windows.

Both layouts answer the same questions under the same names, so that data, sampling and evaluation
ask the layout instead of branching on its name.
"""
import numpy as np
import torch

from .corpus import DataError
from ..tokenizer import BOS, EOS, PAD, SENTIMENT_TOKENS, review_begin_ids

LONG_REVIEW_POLICIES = ("split", "truncate", "drop")
BOOK_SEPARATOR = "\n"


class ReviewLayout:
    name = "review"
    context_token = BOS  # what precedes the sentiment token of a review
    end_token = EOS
    balances_classes = True  # each row holds one sentiment, so batches can be drawn 50/50
    review_format = "`<bos> <pos|neg> text <eos>`"
    separator_texts = ()  # text the layout puts between reviews, which the tokenizer must cover

    def row_len(self, block_size: int) -> int:
        return block_size + 1

    def encode(self, reviews, tokenizer, block_size: int, long_reviews: str, counts, context_token=BOS):
        """Rows of block_size+1 tokens, one review each, padded with <pad>, and the uint8 sentiment of
        each row (1 positive, 0 negative). Each review begins with context_token.

        A review longer than a row is split into consecutive windows (each target predicted once),
        truncated, or dropped, by `long_reviews`; `counts` records how many were.
        """
        if long_reviews not in LONG_REVIEW_POLICIES:
            raise ValueError(f"long_reviews must be one of {LONG_REVIEW_POLICIES}, got {long_reviews!r}")
        row_len, pad = self.row_len(block_size), tokenizer.token_id(PAD)
        rows, labels = [], []
        for review in reviews:
            tokens = ([tokenizer.token_id(context_token), tokenizer.token_id(SENTIMENT_TOKENS[review.sentiment])]
                      + tokenizer.encode(review.text) + [tokenizer.token_id(EOS)])
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

    def check_val_size(self, val_tokens: int, block_size: int):
        """Any number of rows serves: each row is a whole batch item."""

    def shape_tokens(self, tokens, row_len, path: str):
        """The flat token file as rows of row_len; refuses a file cut short."""
        if tokens.size % row_len:
            raise DataError(f"{path} is truncated: {tokens.size} tokens is no multiple of rows of {row_len}")
        return tokens.reshape(-1, row_len)

    def fits_block_size(self, prepared_block_size: int, block_size: int) -> bool:
        """Whether token files prepared for one block size serve a model of another."""
        return prepared_block_size <= block_size

    def sample_positions(self, tokens, batch_size: int, block_size: int, generator: torch.Generator):
        """Random rows for one batch."""
        return torch.randint(len(tokens), (batch_size,), generator=generator)

    def covering_positions(self, tokens, block_size: int):
        """Positions whose batches together predict the whole split: every row."""
        return torch.arange(len(tokens))

    def load_batch(self, tokens, positions, block_size: int, tokenizer):
        """Inputs and targets (-1 where there is nothing to predict) at the given positions."""
        chunk = torch.from_numpy(tokens[positions.numpy()].astype(np.int64))
        x, y = chunk[:, :-1].clone(), chunk[:, 1:].clone()
        y[y == tokenizer.token_id(PAD)] = -1
        return x, y

    def drop_sentiment(self, x, y, share: float, generator, tokenizer):
        """Each review that begins in x (one a row, or several in packed rows) loses its input sentiment token
        to <pad> with probability `share` (the model learns reviews without one: guidance's unconditioned
        side); the targets stay."""
        begins = torch.isin(x[:, :-1], torch.tensor(review_begin_ids(tokenizer)))
        dropped = (torch.rand(begins.shape, generator=generator) < share) & begins
        x = x.clone()
        x[:, 1:][dropped] = tokenizer.token_id(PAD)
        return x, y

    def decode_reviews(self, tokens, tokenizer):
        """The (sentiment, text) of every review in the token file."""
        begins, eos = review_begin_ids(tokenizer), tokenizer.token_id(EOS)
        pos = tokenizer.token_id(SENTIMENT_TOKENS["pos"])
        reviews = []
        for row in np.asarray(tokens).tolist():
            if row[0] in begins:
                reviews.append(("pos" if row[1] == pos else "neg", row[2:]))
            elif reviews:
                reviews[-1][1].extend(row[1:])  # a later window of a split review: its first token overlaps
        return [(name, tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids)) for name, ids in reviews]


class BookLayout:
    name = "book"
    context_token = BOOK_SEPARATOR
    end_token = BOOK_SEPARATOR
    balances_classes = False  # a window spans reviews of both sentiments
    review_format = "`<pos|neg> text` and a line break"
    separator_texts = (BOOK_SEPARATOR,)

    def row_len(self, block_size: int) -> None:
        return None

    def encode(self, reviews, tokenizer, block_size: int, long_reviews: str, counts):
        """One stream, each review as <sentiment> text ended by a line break, and no labels; any
        review length fits, so block_size, long_reviews and counts play no part."""
        separator = tokenizer.encode(BOOK_SEPARATOR)
        stream = []
        for review in reviews:
            stream.append(tokenizer.token_id(SENTIMENT_TOKENS[review.sentiment]))
            stream.extend(tokenizer.encode(review.text))
            stream.extend(separator)
        return np.array(stream, dtype=np.uint16), None

    def check_val_size(self, val_tokens: int, block_size: int):
        if val_tokens <= block_size:
            raise DataError(f"the val split holds {val_tokens} tokens, fewer than "
                            f"block_size+1={block_size + 1}: use more data or a smaller block")

    def shape_tokens(self, tokens, row_len, path: str):
        return tokens

    def fits_block_size(self, prepared_block_size: int, block_size: int) -> bool:
        return True

    def sample_positions(self, tokens, batch_size: int, block_size: int, generator: torch.Generator):
        """Random window starts for one batch."""
        return torch.randint(len(tokens) - window_length(tokens, block_size), (batch_size,), generator=generator)

    def covering_positions(self, tokens, block_size: int):
        """Starts of non-overlapping windows over the split."""
        return torch.arange(0, len(tokens) - block_size - 1, block_size)

    def load_batch(self, tokens, positions, block_size: int, tokenizer):
        T = window_length(tokens, block_size)
        x = torch.stack([torch.from_numpy(tokens[i:i + T].astype(np.int64)) for i in positions.tolist()])
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + T].astype(np.int64)) for i in positions.tolist()])
        return x, y

    def decode_reviews(self, tokens, tokenizer):
        names = {tokenizer.token_id(t): name for name, t in SENTIMENT_TOKENS.items()}
        out, current = [], None
        for token in np.asarray(tokens).tolist():
            if token in names:
                current = (names[token], [])
                out.append(current)
            elif current is not None:
                current[1].append(token)
        return [(name, tokenizer.decode(ids).strip()) for name, ids in out]


def window_length(tokens, block_size: int) -> int:
    """A book batch's window: block_size tokens, or all but one when the stream is shorter."""
    return min(block_size, len(tokens) - 1)


LAYOUTS = {layout.name: layout for layout in (ReviewLayout(), BookLayout())}


def get_layout(name: str):
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {name!r}") from None
