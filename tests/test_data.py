import json
import os

import numpy as np
import pytest
import torch

from conftest import synthetic_reviews
from mingpt.data.corpus import DataError
from mingpt.data.tokens import TokenData, write_data_dir
from mingpt.data.corpus import Review
from mingpt.tokenizer import BOS, EXTRA_BOS, PAD, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    """40 synthetic reviews prepared in each layout with block size 8."""
    dirs = {}
    for name in ("review", "book"):
        dirs[name] = str(tmp_path_factory.mktemp(name))
        write_data_dir(synthetic_reviews(40), {}, dirs[name], layout=name, block_size=8)
    return dirs


def test_prepare_writes_readable_files_and_batches(review_data_dir, book_data_dir):
    meta = json.load(open(os.path.join(review_data_dir, "meta.json"), encoding="utf-8"))
    assert meta["layout"] == "review" and meta["reviews"] == 400 and meta["positive"] == 200
    assert meta["splits"]["val"]["reviews"] == 40
    data = TokenData(review_data_dir)
    x, y = data.get_batch("train", 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32)
    assert (x[:, 0] == data.tokenizer.token_id(BOS)).all()
    assert (x[:, 1:] == torch.where(y[:, :-1] == -1, data.tokenizer.token_id(PAD), y[:, :-1])).all()
    book = TokenData(book_data_dir)
    x, y = book.get_batch("val", 3, 32, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert book.eos_id == book.tokenizer.token_id("\n")


def test_token_data_errors(tmp_path, review_data_dir):
    with pytest.raises(DataError, match="python -m mingpt.prepare"):
        TokenData(str(tmp_path))
    with pytest.raises(DataError, match="block_size 16"):
        TokenData(review_data_dir).check_block_size(16)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(review_data_dir):
        (broken / name).write_bytes(open(os.path.join(review_data_dir, name), "rb").read())
    with open(broken / "train.bin", "ab") as f:
        f.write(b"\x01\x00")
    with pytest.raises(DataError, match="truncated"):
        TokenData(str(broken))


# Positions and batches drawn for a fixed generator state: a resumed run must draw exactly these.
def test_review_batches_for_a_seeded_generator(small_dirs):
    data = TokenData(small_dirs["review"])
    positions = data.sample_positions("train", 3, 8, torch.Generator().manual_seed(0))
    assert positions.tolist() == [24, 3, 29]
    x, y = data.load_batch("train", positions, 8)
    assert x.tolist() == [[6, 12, 2, 0, 0, 0, 0, 0], [1, 3, 23, 42, 50, 7, 13, 2], [1, 3, 26, 23, 42, 15, 6, 11]]
    assert y.tolist() == [[12, 2, -1, -1, -1, -1, -1, -1], [3, 23, 42, 50, 7, 13, 2, -1],
                          [3, 26, 23, 42, 15, 6, 11, 2]]
    data.set_balance("on")
    assert data.sample_positions("train", 6, 8, torch.Generator().manual_seed(0)).tolist() == [28, 60, 33, 40, 30, 31]
    assert data.sample_positions("val", 3, 8, torch.Generator().manual_seed(0)).tolist() == [4, 9, 3]


def test_book_batches_for_a_seeded_generator(small_dirs):
    data = TokenData(small_dirs["book"])
    positions = data.sample_positions("train", 3, 8, torch.Generator().manual_seed(0))
    assert positions.tolist() == [396, 269, 336]
    x, y = data.load_batch("train", positions, 8)
    assert x.tolist() == [[52, 23, 36, 52, 41, 42, 16, 8], [24, 43, 52, 19, 28, 17, 43, 52],
                          [16, 7, 15, 5, 4, 18, 33, 46]]
    assert y.tolist() == [[23, 36, 52, 41, 42, 16, 8, 9], [43, 52, 19, 28, 17, 43, 52, 30],
                          [7, 15, 5, 4, 18, 33, 46, 16]]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_extra_training_reviews_begin_with_their_own_token(tmp_path, kind):
    own = synthetic_reviews(40)
    extra = [Review("这家酒店房间很干净服务也好", "pos"), Review("电脑用了三天就坏了", "neg"),
             Review(own[0].text, "pos"), Review(f"混进来的{EXTRA_BOS}", "neg")]
    write_data_dir(own, {}, str(tmp_path), block_size=32, tokenizer=kind, bpe_vocab_size=300, extra_train=extra,
            extra_source="hotels")
    data = TokenData(str(tmp_path))
    tokenizer = data.tokenizer
    assert tokenizer.special_tokens == SPECIAL_TOKENS + (EXTRA_BOS,)  # the first ids are as without extra reviews
    rows = data.splits["train"]
    begins = np.isin(rows[:, 0], [tokenizer.token_id(BOS), tokenizer.token_id(EXTRA_BOS)])  # not later windows
    for source, token in ((0, BOS), (1, EXTRA_BOS)):
        assert set(rows[begins & (data.sources == source), 0].tolist()) == {tokenizer.token_id(token)}
    texts = {text for _, text in data.review_texts("train")}
    assert {"这家酒店房间很干净服务也好", "电脑用了三天就坏了"} <= texts and f"混进来的{EXTRA_BOS}" not in texts
    assert data.meta["extra_train"]["reviews"] == 2 + (own[0].text not in {t for _, t in data.review_texts("val")})
    x, y = data.load_batch("train", torch.arange(len(rows)), 32)
    dropped_x, dropped_y = data.layout.drop_sentiment(x, y, 1.0, torch.Generator().manual_seed(0), tokenizer)
    assert (dropped_x[torch.from_numpy(begins), 1] == tokenizer.token_id(PAD)).all() and torch.equal(dropped_y, y)


def test_prepared_data_without_extra_reviews_keeps_the_five_special_tokens(small_dirs):
    assert TokenData(small_dirs["review"]).tokenizer.special_tokens == SPECIAL_TOKENS
