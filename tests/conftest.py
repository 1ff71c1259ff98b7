import os
import random
import sys

import pytest
import torch

# The benchmark helpers the tests use (loadtest, gpu_check) live in benchmarks/, outside the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mingpt.data.corpus import Review
from mingpt.data.tokens import write_data_dir

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
    write_data_dir(synthetic_reviews(400), {}, path, layout="review", block_size=32, source="synthetic")
    return path


@pytest.fixture(scope="session")
def book_data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("book_data"))
    write_data_dir(synthetic_reviews(400), {}, path, layout="book", block_size=32, source="synthetic")
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA GPU: without one they skip, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); `make gpu-check` runs it on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_ckpt(review_data_dir, tmp_path_factory):
    """A tiny untrained model on the synthetic reviews' vocabulary, as a checkpoint directory."""
    from mingpt.checkpoint import atomic_torch_save, make_checkpoint
    from mingpt.config import GPTConfig
    from mingpt.model import GPT
    from mingpt.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(f"{review_data_dir}/tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.vocab_size))
    folder = tmp_path_factory.mktemp("serve_ckpt")
    atomic_torch_save(make_checkpoint(model, tokenizer, {"layout": "review", "eos_token": "<eos>",
                                                         "source": "synthetic reviews"}), str(folder / "ckpt.pt"))
    return str(folder)


def wait_until(condition, what: str, timeout: float = 30.0, every: float = 0.01):
    """Poll condition() until it is true; a failure naming `what` after `timeout` seconds (never a hang)."""
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(every)


class LiveServer:
    """`python -m mingpt.serve`'s app and engine, served by uvicorn on a loopback port in a thread."""

    def __init__(self, ckpt, *flags, start_engine=True):
        import threading
        import uvicorn
        from mingpt.serve.__main__ import build_parser, build_server, uvicorn_config
        self.port = free_port()
        args = build_parser().parse_args(["--ckpt", ckpt, "--port", str(self.port), *flags])
        self.app, self.engine = build_server(args, start_engine=start_engine)
        self.server = uvicorn.Server(uvicorn_config(self.app, args))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        import time
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        if start_engine:  # /health is 503 "loading" until the worker has run the model once
            wait_until(lambda: self.engine.ready, "the engine to load")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.close()


@pytest.fixture(scope="session")
def live_server(serve_ckpt):
    pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
    server = LiveServer(serve_ckpt)
    yield server
    server.stop()
