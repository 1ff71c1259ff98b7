import os
import random

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mingpt.corpus import Review
from mingpt.data import prepare

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

POSITIVE = ["好看", "很好看", "精彩", "喜欢", "感动", "推荐", "演技很好", "剧情不错", "值得一看"]
NEGATIVE = ["难看", "无聊", "失望", "烂片", "浪费时间", "剧情拖沓", "演技很差", "不推荐"]


def synthetic_reviews(n: int, seed: int = 0):
    """Short reviews built from phrases whose sentiment is known."""
    rng = random.Random(seed)
    reviews = []
    for i in range(n):
        sentiment = "pos" if i % 2 == 0 else "neg"
        phrases = POSITIVE if sentiment == "pos" else NEGATIVE
        text = "，".join(rng.choice(phrases) for _ in range(rng.randint(1, 4))) + rng.choice("。！")
        reviews.append(Review(f"{text}{i}", sentiment))
    return reviews


def tiny_cfg(data_dir, out_dir, **overrides):
    """The tiny preset reading data_dir and writing out_dir, quiet, with fields overridden."""
    from mingpt.config import preset_config
    cfg = preset_config("tiny")
    cfg.data_dir, cfg.out_dir, cfg.progress = data_dir, str(out_dir), False
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def shared_csv(name: str) -> str:
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isfile(path):
        pytest.skip(f"{name} is not in ../shared/data (the real review sets are not redistributed)")
    return path


@pytest.fixture(scope="session")
def review_data_dir(tmp_path_factory):
    """A prepared `review` layout data dir of 400 synthetic reviews, block size 32."""
    path = str(tmp_path_factory.mktemp("review_data"))
    prepare(synthetic_reviews(400), {}, path, layout="review", block_size=32, source="synthetic")
    return path


@pytest.fixture(scope="session")
def book_data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("book_data"))
    prepare(synthetic_reviews(400), {}, path, layout="book", block_size=32, source="synthetic")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
