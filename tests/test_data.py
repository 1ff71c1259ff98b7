import json
import os

import pytest
import torch

from conftest import synthetic_reviews
from mingpt.corpus import DataError
from mingpt.data import TokenData, prepare
from mingpt.tokenizer import BOS, PAD


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    """40 synthetic reviews prepared in each layout with block size 8."""
    dirs = {}
    for name in ("review", "book"):
        dirs[name] = str(tmp_path_factory.mktemp(name))
        prepare(synthetic_reviews(40), {}, dirs[name], layout=name, block_size=8)
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
