import signal

import numpy as np
import pytest
import torch

from conftest import synthetic_reviews, tiny_cfg
from mingpt import GPT, GPTConfig
from mingpt.data.corpus import Review
from mingpt.data.tokens import TokenData, write_data_dir
from mingpt.data.packing import ReviewPacker, load_packed
from mingpt.train import loop as training
from mingpt.train.loop import train
from mingpt.train.schedule import learning_rate

PAD = 0


def stored_rows(lengths, row_len=9):
    """Review-layout rows whose real tokens are 10*review+1, 10*review+2, ... then padding."""
    rows = np.full((len(lengths), row_len), PAD, dtype=np.uint16)
    for review, length in enumerate(lengths):
        rows[review, :length] = 10 * review + 1 + np.arange(length)
    return rows


def test_load_packed_lays_out_inputs_targets_and_starts():
    rows = stored_rows([3, 4, 2])
    x, y, starts = load_packed(rows, [[0, 1], [2]], PAD)
    assert x.tolist() == [[1, 2, 3, 11, 12, 13, 14, 0], [21, 22, 0, 0, 0, 0, 0, 0]]
    # each review's last token predicts nothing (the next review is not its continuation), nor does padding
    assert y.tolist() == [[2, 3, -1, 12, 13, 14, -1, -1], [22, -1, -1, -1, -1, -1, -1, -1]]
    assert starts.tolist() == [[0, 0, 0, 3, 3, 3, 3, 7], [0, 0, 2, 2, 2, 2, 2, 2]]


def test_a_review_that_ends_the_row_predicts_its_last_token():
    x, y, starts = load_packed(stored_rows([4, 5]), [[0, 1]], PAD)
    assert x.tolist() == [[1, 2, 3, 4, 11, 12, 13, 14]]
    assert y.tolist() == [[2, 3, 4, -1, 12, 13, 14, 15]]
    assert starts.tolist() == [[0, 0, 0, 0, 4, 4, 4, 4]]


def test_the_packer_fills_rows_and_keeps_every_drawn_review():
    rng = np.random.default_rng(0)
    lengths = np.minimum(65, 3 + rng.geometric(1 / 16, size=500)).tolist()  # short reviews, a few of a whole row
    packer = ReviewPacker(stored_rows(lengths, row_len=65), PAD)
    generator = torch.Generator().manual_seed(0)
    drawn = []

    def draw(n):
        picks = torch.randint(len(lengths), (n,), generator=generator)
        drawn.extend(picks.tolist())
        return picks

    placed = []
    for _ in range(20):
        plan = packer.plan(8, draw)
        assert len(plan) == 8 and all(sum(lengths[r] for r in row) <= 65 for row in plan)
        placed += [r for row in plan for r in row]
    assert sorted(placed + packer.waiting) == sorted(drawn)  # nothing drawn is lost, long reviews included
    share = sum(lengths[r] for r in placed) / (20 * 8 * 65)
    assert share > 0.9, f"packed rows are only {share:.0%} reviews"


def test_waiting_reviews_go_first():
    packer = ReviewPacker(stored_rows([8, 8, 8, 2], row_len=9), PAD)
    plan = packer.plan(1, lambda n: torch.tensor([0, 1, 2, 3][:n]))
    assert plan == [[0]] and packer.waiting == []  # [0] fills the row: nothing more is drawn
    packer.waiting = [3, 1]
    assert packer.plan(1, lambda n: torch.tensor([2] * n)) == [[3]]
    assert packer.waiting == [1]  # it fits no row: it waits, and with a row of misfits the batch is done


def test_a_packed_row_predicts_each_review_as_it_would_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=3, n_embd=24, block_size=16, vocab_size=50),
                backend="reference").eval()
    reviews = [torch.randint(1, 50, (n,)) for n in (5, 1, 7)]
    row = torch.cat(reviews + [torch.zeros(3, dtype=torch.long)]).unsqueeze(0)
    starts = torch.tensor([[0] * 5 + [5] + [6] * 7 + [13] * 3])
    packed, _ = model(row, starts=starts)
    offset = 0
    for review in reviews:
        alone, _ = model(review.unsqueeze(0))
        torch.testing.assert_close(packed[0, offset:offset + len(review)], alone[0], rtol=1e-5, atol=1e-5)
        offset += len(review)


def test_packed_inputs_are_checked():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=10), backend="reference")
    with pytest.raises(ValueError, match="starts shape"):
        model(torch.zeros(2, 4, dtype=torch.long), starts=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="starts must be integers"):
        model(torch.zeros(1, 4, dtype=torch.long), starts=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=model.new_cache(1), starts=torch.zeros(1, 4, dtype=torch.long))


def straight_and_resumed(data_dir, tmp_path, monkeypatch, stop_at: int, **options):
    """The results of a straight run, and of a run stopped by a signal after step stop_at and resumed."""
    straight = train(tiny_cfg(data_dir, tmp_path / "straight", **options))
    step = training.optimizer_step

    def step_then_signal(run):
        result = step(run)
        if run.it == stop_at:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(training, "optimizer_step", step_then_signal)
    with pytest.raises(training.Interrupted):
        train(tiny_cfg(data_dir, tmp_path / "stopped", **options))
    monkeypatch.setattr(training, "optimizer_step", step)
    return straight, train(tiny_cfg(data_dir, tmp_path / "stopped", resume=True, **options))


def test_packed_training_computes_on_reviews_and_resumes_bitwise(review_data_dir, tmp_path, monkeypatch):
    """Packing, Muon, the wsd schedule and averaged weights resume exactly: a run stopped by a signal at step
    10 and resumed ends where the straight run ends."""
    options = dict(pack=True, optimizer="muon", schedule="wsd", ema_decay=0.9, max_iters=20, eval_interval=10,
                   backend="reference")
    straight, resumed = straight_and_resumed(review_data_dir, tmp_path, monkeypatch, stop_at=10, **options)
    assert resumed["val_loss"] == straight["val_loss"]
    unpacked = train(tiny_cfg(review_data_dir, tmp_path / "c", max_iters=20, eval_interval=10, backend="reference"))
    assert straight["real_token_share"] > 0.9 and unpacked["real_token_share"] < 0.8 * straight["real_token_share"]
    assert straight["val_nats_per_char"] > 0


def test_pack_needs_the_review_layout(book_data_dir):
    with pytest.raises(Exception, match="--pack needs the review layout"):
        TokenData(book_data_dir).set_packing(True)


def test_wsd_holds_then_decays_by_steps_or_time():
    cfg = tiny_cfg("unused", "unused", max_iters=100, warmup_iters=10, schedule="wsd", decay_fraction=0.2,
                   learning_rate=1.0, min_lr=0.1)
    assert learning_rate(5, cfg) < 1.0
    assert learning_rate(10, cfg) == learning_rate(79, cfg) == 1.0
    assert learning_rate(90, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(100, cfg) == pytest.approx(0.1)
    assert learning_rate(20, cfg, time_share=0.9) == pytest.approx(0.1 + 0.9 * 0.5)  # the budget ends first


def reshuffled_data(path, balance="off", extra=(), extra_share=0.0) -> TokenData:
    write_data_dir(synthetic_reviews(60), {}, str(path), block_size=32, source="synthetic", extra_train=extra,
                   extra_source="synthetic extra")
    data = TokenData(str(path))
    data.set_balance(balance)
    data.set_extra_share(extra_share)
    data.set_reshuffle(True)
    return data


def draws(data: TokenData, n: int, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    while len(drawn) < n:
        drawn += data.sample_positions("train", 5, None, generator).tolist()
    return drawn[:n]


def assert_passes(drawn: list, rows: list):
    """Each run of len(rows) draws is every row once, and the passes come in different orders."""
    passes = [drawn[i:i + len(rows)] for i in range(0, len(drawn), len(rows))]
    assert len(passes) >= 2 and all(sorted(p) == sorted(rows) for p in passes), passes
    assert passes[0] != passes[1]


def test_reshuffle_draws_every_review_once_a_pass(tmp_path):
    data = reshuffled_data(tmp_path)
    rows = list(range(len(data.splits["train"])))
    assert_passes(draws(data, 3 * len(rows)), rows)
    data.set_reshuffle(False)
    assert sorted(set(draws(data, len(rows)))) != rows  # drawn with replacement, some twice and some never


def test_reshuffle_keeps_the_source_share_and_the_sentiment_balance(tmp_path):
    extra = [Review(f"额外的评论{i}", "pos" if i % 3 else "neg") for i in range(30)]
    data = reshuffled_data(tmp_path / "mix", balance="on", extra=extra, extra_share=0.5)
    drawn = draws(data, 1200)
    labels = data.row_labels("train")
    for source in (0, 1):
        for sentiment in (0, 1):
            group = [r for r in range(len(labels)) if data.sources[r] == source and labels[r] == sentiment]
            in_group = [r for r in drawn if r in set(group)]
            assert_passes(in_group[:len(in_group) // len(group) * len(group)], group)
    assert 0.4 < np.mean([data.sources[r] for r in drawn]) < 0.6
    assert 0.4 < np.mean([labels[r] for r in drawn]) < 0.6  # balanced, though a third of the extra is negative


def test_reshuffle_needs_the_review_layout(book_data_dir):
    with pytest.raises(Exception, match="--reshuffle needs the review layout"):
        TokenData(book_data_dir).set_reshuffle(True)


def test_reshuffled_training_resumes_bitwise_across_passes(tmp_path, monkeypatch):
    """A run stopped mid-pass and resumed draws what the straight run draws (60 reviews: a pass every few steps)."""
    reshuffled_data(tmp_path / "data")
    straight, resumed = straight_and_resumed(str(tmp_path / "data"), tmp_path, monkeypatch, stop_at=5, pack=True,
                                             reshuffle=True, max_iters=12, eval_interval=6, backend="reference")
    assert resumed["val_loss"] == straight["val_loss"]
