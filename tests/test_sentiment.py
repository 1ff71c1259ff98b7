"""Sentiment control, class balance, fine-tuning vocabularies and the BPE tokenizer end to end."""
import pytest
import torch

from conftest import synthetic_reviews, tiny_cfg
from mingpt.checkpoint import CheckpointError, load
from mingpt.data.corpus import DataError, Review
from mingpt.data.layouts import get_layout
from mingpt.data.tokens import TokenData, write_data_dir
from mingpt.sample.reviews import write_samples
from mingpt.sample.settings import SamplingSettings
from mingpt.tokenizer import BOS, NEG, POS, load_tokenizer
from mingpt.train.loop import train

# write_samples' settings before one settings object held them: temperature 0.8, no truncation or controls.
WRITE_SAMPLES = SamplingSettings.plain(temperature=0.8)


def imbalanced_dir(tmp_path, negatives=20, positives=180):
    reviews = [r for r in synthetic_reviews(400) if r.sentiment == "pos"][:positives]
    reviews += [r for r in synthetic_reviews(400) if r.sentiment == "neg"][:negatives]
    meta = write_data_dir(reviews, {}, str(tmp_path / "imbalanced"), block_size=32, source="synthetic")
    return str(tmp_path / "imbalanced"), meta


def test_each_review_row_carries_its_sentiment_token(review_data_dir):
    data = TokenData(review_data_dir)
    labels = data.row_labels("train")
    tok = data.tokenizer
    rows = data.splits["train"]
    assert all(row[1] == tok.token_id(POS if label else NEG) for row, label in zip(rows, labels) if row[0] == tok.token_id(BOS))
    texts = data.review_texts("val")
    assert len(texts) == 40 and {s for s, _ in texts} == {"pos", "neg"}


def test_balance_auto_oversamples_the_minority(tmp_path):
    data_dir, meta = imbalanced_dir(tmp_path)
    data = TokenData(data_dir)
    assert "on" in data.set_balance("auto")
    labels = data.row_labels("train")
    positions = data.sample_positions("train", 4000, 32, torch.Generator().manual_seed(0))
    assert 0.45 < labels[positions.numpy()].mean() < 0.55 < labels.mean()
    assert "off" in data.set_balance("off")
    positions = data.sample_positions("train", 4000, 32, torch.Generator().manual_seed(0))
    assert labels[positions.numpy()].mean() > 0.85


def test_balance_stays_off_for_balanced_data_and_book_layout(review_data_dir, book_data_dir):
    assert "off" in TokenData(review_data_dir).set_balance("auto")
    assert "off" in TokenData(book_data_dir).set_balance("auto")
    with pytest.raises(DataError, match="review layout"):
        TokenData(book_data_dir).set_balance("on")


def test_sentiment_prompt_is_explicit(review_data_dir, tmp_path):
    train(tiny_cfg(review_data_dir, tmp_path, max_iters=30))
    loaded = load(str(tmp_path))
    model, tok = loaded.model, loaded.tokenizer
    samples = write_samples(model, tok, get_layout("review"), "难看", "neg", 4, 10, WRITE_SAMPLES, seed=0)
    assert all(s == "neg" and text.startswith("难看") for s, text in samples)
    drawn = write_samples(model, tok, get_layout("review"), "", "auto", 40, 2, WRITE_SAMPLES, seed=0)
    assert {s for s, _ in drawn} == {"pos", "neg"}   # auto draws the sentiment from the model


def test_finetune_with_a_union_vocabulary(review_data_dir, tmp_path):
    train(tiny_cfg(review_data_dir, tmp_path / "pre", max_iters=10))
    base = load_tokenizer(f"{review_data_dir}/tokenizer.json")
    new_reviews = [Review("全新的字符组合，超级棒", "pos"), Review("糟糕透顶的体验", "neg")] * 20
    with pytest.raises(CheckpointError, match="--vocab_from"):
        other = str(tmp_path / "other")
        write_data_dir(new_reviews, {}, other, block_size=32)
        train(tiny_cfg(other, tmp_path / "ft-bad", max_iters=2, init_from=str(tmp_path / "pre")))
    union = str(tmp_path / "union")
    meta = write_data_dir(new_reviews, {}, union, block_size=32, base_tokenizer=base)
    assert meta["base_vocab_size"] == base.vocab_size < meta["vocab_size"]
    assert load_tokenizer(f"{union}/tokenizer.json").itos[:base.vocab_size] == base.itos
    pre = load(str(tmp_path / "pre")).model
    cfg = tiny_cfg(union, tmp_path / "ft", max_iters=1, learning_rate=0.0, min_lr=0.0, warmup_iters=0,
                   init_from=str(tmp_path / "pre"))
    cfg.model.n_layer = 5  # ignored: the architecture comes from the checkpoint
    train(cfg)
    tuned = load(str(tmp_path / "ft")).model
    assert tuned.config.n_layer == pre.config.n_layer
    old_rows = pre.transformer.wte.weight
    assert torch.equal(tuned.transformer.wte.weight[:old_rows.shape[0]], old_rows)
    assert torch.equal(tuned.transformer.h[0].attn.c_attn.weight, pre.transformer.h[0].attn.c_attn.weight)


def test_bpe_tokenizer_end_to_end(tmp_path):
    pytest.importorskip("tokenizers")
    data_dir = str(tmp_path / "bpe")
    meta = write_data_dir(synthetic_reviews(400), {}, data_dir, block_size=32, tokenizer="bpe", bpe_vocab_size=300)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 300
    tok = load_tokenizer(f"{data_dir}/tokenizer.json")
    assert tok.decode(tok.encode("好看，演技很好！")) == "好看，演技很好！"
    assert len(tok.encode("演技很好")) < len("演技很好".encode())   # merges learned
    result = train(tiny_cfg(data_dir, tmp_path / "out", max_iters=60, eval_interval=30))
    assert result["val_loss"] < 4.0
    loaded = load(str(tmp_path / "out"))
    model, tok = loaded.model, loaded.tokenizer
    for sampler in ("reference", "auto"):
        samples = write_samples(model, tok, get_layout("review"), "好看", "pos", 3, 12, WRITE_SAMPLES, seed=1,
                                sampler=sampler)
        assert all(text.startswith("好看") for _, text in samples)
    greedy = [write_samples(model, tok, get_layout("review"), "好看", "pos", 2, 12,
                            WRITE_SAMPLES.replace(temperature=0), sampler=s)
              for s in ("reference", "auto")]
    assert greedy[0] == greedy[1]


def test_sentiment_dropout_pads_the_sentiment_token_of_a_share_of_rows(review_data_dir, book_data_dir, tmp_path):
    data = TokenData(review_data_dir)
    tok = data.tokenizer
    x, y = data.load_batch("train", torch.arange(len(data.splits["train"])), 32)
    dropped_x, dropped_y = data.layout.drop_sentiment(x, y, 0.25, torch.Generator().manual_seed(0), tok)
    starts = x[:, 0] == tok.token_id(BOS)
    dropped = dropped_x[:, 1] != x[:, 1]
    assert (dropped_x[dropped, 1] == tok.token_id("<pad>")).all() and not (dropped & ~starts).any()
    assert 0.15 < float(dropped[starts].float().mean()) < 0.35
    assert torch.equal(dropped_x[:, 2:], x[:, 2:]) and torch.equal(dropped_y, y)  # targets stay
    again, _ = data.layout.drop_sentiment(x, y, 0.25, torch.Generator().manual_seed(0), tok)
    assert torch.equal(again, dropped_x)
    with pytest.raises(ValueError, match="sentiment_dropout"):
        train(tiny_cfg(book_data_dir, tmp_path / "book", max_iters=2, sentiment_dropout=0.1))


def test_guidance_against_none_and_stop_strings_in_write_samples(review_data_dir, tmp_path):
    train(tiny_cfg(review_data_dir, tmp_path, max_iters=30, sentiment_dropout=0.2))
    loaded = load(str(tmp_path))
    model, tok = loaded.model, loaded.tokenizer
    layout = get_layout("review")
    pieces = {}
    guided = write_samples(model, tok, layout, "好看", "pos", 4, 20,
                           WRITE_SAMPLES.replace(guidance=2.0, guide_against="none", stop=("！", "。")), seed=3,
                           on_text=lambda row, piece, s: pieces.setdefault(row, []).append(piece))
    for row, (_, text) in enumerate(guided):
        assert "".join(p for p in pieces[row] if p) == text  # the streamed pieces add up to the text
        ends = [i for i in (text.find("！", 2), text.find("。", 2)) if i >= 0]
        assert not ends or min(ends) == len(text) - 1
    greedy = [write_samples(model, tok, layout, "好看", "neg", 2, 20,
                            SamplingSettings.plain(temperature=0, guidance=3.0, repetition_penalty=1.3, stop=("！",)),
                            sampler=s)
              for s in ("reference", "kvcache", "auto")]
    assert greedy[0] == greedy[1] == greedy[2]
    settings = WRITE_SAMPLES.replace(guidance=2.0, no_repeat_ngram_size=3)
    assert write_samples(model, tok, layout, "难看", "neg", 5, 20, settings, seed=4) == \
        write_samples(model, tok, layout, "难看", "neg", 5, 20, settings.replace(stop=("never written",)), seed=4)
    with pytest.raises(ValueError, match="guide_against"):
        write_samples(model, tok, layout, "好看", "pos", 1, 4, WRITE_SAMPLES.replace(guidance=2.0, guide_against="x"))
