"""The `review` and `book` layouts as objects: chosen by name, their tokens, and batches as before the split."""
import collections
import shutil

import numpy as np
import pytest

from conftest import synthetic_reviews
from mingpt.data.corpus import DataError, Review
from mingpt.data.tokens import TokenData, write_data_dir
from mingpt.data.layouts import BookLayout, ReviewLayout, get_layout
from mingpt.tokenizer import BOS, EOS, NEG, PAD, POS, CharTokenizer


def test_layouts_are_chosen_by_name():
    assert isinstance(get_layout("review"), ReviewLayout) and get_layout("review").name == "review"
    assert isinstance(get_layout("book"), BookLayout) and get_layout("book").name == "book"
    with pytest.raises(ValueError, match=r"layout must be one of \('review', 'book'\), got 'novel'"):
        get_layout("novel")


def test_context_and_end_tokens():
    assert (ReviewLayout.context_token, ReviewLayout.end_token) == (BOS, EOS)
    assert (BookLayout.context_token, BookLayout.end_token) == ("\n", "\n")
    assert ReviewLayout.balances_classes and not BookLayout.balances_classes


def test_unknown_layout_is_refused_by_prepare_and_token_data(tmp_path, book_data_dir):
    with pytest.raises(ValueError, match="got 'novel'"):
        write_data_dir(synthetic_reviews(40), {}, str(tmp_path / "novel"), layout="novel")
    broken = tmp_path / "broken"
    shutil.copytree(book_data_dir, broken)
    meta = broken / "meta.json"
    meta.write_text(meta.read_text(encoding="utf-8").replace('"book"', '"novel"'), encoding="utf-8")
    with pytest.raises(DataError, match=r"meta\.json: layout must be one of"):
        TokenData(str(broken))


def test_covering_positions_predict_each_split_once():
    rows, stream = np.zeros((5, 9), dtype=np.uint16), np.zeros(40, dtype=np.uint16)
    assert ReviewLayout().covering_positions(rows, 8).tolist() == [0, 1, 2, 3, 4]  # every row
    assert BookLayout().covering_positions(stream, 8).tolist() == [0, 8, 16, 24]  # non-overlapping windows


@pytest.mark.parametrize("name", ["review", "book"])
def test_decoding_gives_back_the_encoded_reviews(name):
    reviews = synthetic_reviews(6) + [Review("好看难看" * 4, "neg")]  # longer than a row: split into windows
    tokenizer = CharTokenizer.train([r.text for r in reviews] + ["\n"])
    layout = get_layout(name)
    tokens, _ = layout.encode(reviews, tokenizer, 7, "split", collections.Counter())
    assert layout.decode_reviews(tokens, tokenizer) == [(r.sentiment, r.text) for r in reviews]


def test_review_layout_rows_and_long_review_policies():
    tok = CharTokenizer.train(["好看难"])
    short, long_ = Review("好看", "pos"), Review("好看难" * 5, "neg")  # 15 chars + 3 specials = 18 tokens
    for policy, n_rows in (("split", 1 + 3), ("truncate", 2), ("drop", 1)):
        counts = collections.Counter()
        rows, labels = ReviewLayout().encode([short, long_], tok, block_size=7, long_reviews=policy, counts=counts)
        assert rows.shape == (n_rows, 8) and rows.dtype == np.uint16
        assert labels.tolist() == [1] + [0] * (n_rows - 1)
        assert counts == {f"long reviews ({policy})": 1}
    rows, _ = ReviewLayout().encode([short], tok, 7, "split", collections.Counter())
    assert tok.decode(rows[0].tolist(), skip_special=False) == f"{BOS}{POS}好看{EOS}{PAD}{PAD}{PAD}"
    split_rows, _ = ReviewLayout().encode([long_], tok, 7, "split", collections.Counter())
    # windows overlap by one token so that every target is predicted exactly once
    assert [int(r[0]) for r in split_rows[1:]] == [int(r[-1]) for r in split_rows[:-1]]
    assert tok.decode(split_rows[0].tolist(), skip_special=False).startswith(f"{BOS}{NEG}")
