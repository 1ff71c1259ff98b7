"""A user's runs are safe: a re-used out_dir is refused and left as it was, --overwrite moves the old run
aside, out_dir/run.json records how each run was made, and every evaluation prints a sample per sentiment."""
import json
import os
import re

import pytest
import torch

from conftest import tiny_cfg

from mingpt.train import state
from mingpt.checkpoint import load_checkpoint
from mingpt.train.records import RunExists
from mingpt.train.loop import train


def snapshot(folder):
    """Every file under folder: its bytes and modification time."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def test_a_reused_out_dir_is_refused_and_nothing_in_it_changes(book_data_dir, tmp_path):
    train(tiny_cfg(book_data_dir, tmp_path, max_iters=4, eval_interval=2, eval_iters=1))
    before = snapshot(tmp_path)
    assert {"ckpt.pt", "best.pt", "metrics.csv", "loss.png", "run.json"} <= set(before)
    with pytest.raises(RunExists) as refused:
        train(tiny_cfg(book_data_dir, tmp_path, max_iters=8, eval_interval=2, eval_iters=1))
    message = str(refused.value)
    assert message.startswith(f"{tmp_path} already holds a run (iter 4, val loss ")
    assert re.search(r", best \d+\.\d{4}, last written \d{4}-\d\d-\d\d \d\d:\d\d\)", message)
    assert "overwrite its ckpt.pt, best.pt, metrics.csv" in message
    for choice in ("--resume ", "--out_dir NEW_DIR ", "--overwrite ", "nothing is deleted"):
        assert choice in message
    assert snapshot(tmp_path) == before


def test_overwrite_moves_the_old_run_aside(book_data_dir, tmp_path, capsys):
    train(tiny_cfg(book_data_dir, tmp_path, max_iters=4, eval_interval=2, eval_iters=1))
    before = snapshot(tmp_path)
    train(tiny_cfg(book_data_dir, tmp_path, max_iters=2, eval_interval=2, eval_iters=1, overwrite=True))
    (moved,) = os.listdir(tmp_path / "previous")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", moved)
    out = capsys.readouterr().out
    assert f"--overwrite: moved the earlier run in {tmp_path} to {tmp_path / 'previous' / moved}" in out
    kept = snapshot(tmp_path / "previous" / moved)
    assert {name: data for name, (data, _) in kept.items()} == {name: data for name, (data, _) in before.items()}
    assert load_checkpoint(str(tmp_path / "previous" / moved / "ckpt.pt"))["iter_num"] == 4
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 2
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].startswith("2,")
    # a second --overwrite keeps both earlier runs
    train(tiny_cfg(book_data_dir, tmp_path, max_iters=1, eval_interval=1, eval_iters=1, overwrite=True))
    assert len(os.listdir(tmp_path / "previous")) == 2


def test_what_is_found_decides_the_message(book_data_dir, tmp_path):
    (tmp_path / "metrics.csv").write_text("iter,train_loss,val_loss,lr,tokens_per_s,elapsed_s\n"
                                          "100,2.0,2.5000,1e-3,0,1\n200,1.5,2.2500,1e-3,0,2\n")
    with pytest.raises(RunExists, match=r"iter 200, val loss 2\.2500, best 2\.2500, last") as refused:
        train(tiny_cfg(book_data_dir, tmp_path, max_iters=1))
    assert "--resume" not in str(refused.value)  # nothing to resume from without ckpt.pt
    with pytest.raises(ValueError, match="choose one"):
        train(tiny_cfg(book_data_dir, tmp_path, max_iters=1, resume=True, overwrite=True))
    os.unlink(tmp_path / "metrics.csv")
    train(tiny_cfg(book_data_dir, tmp_path / "b", max_iters=2, eval_interval=2, eval_iters=1))
    os.unlink(tmp_path / "b" / "metrics.csv")  # a checkpoint alone is described from the checkpoint
    with pytest.raises(RunExists, match=r"already holds a run \(iter 2, best val loss \d+\.\d{4}, last written"):
        train(tiny_cfg(book_data_dir, tmp_path / "b", max_iters=1))


def test_run_json_records_how_the_run_was_made(review_data_dir, tmp_path):
    result = train(tiny_cfg(review_data_dir, tmp_path, max_iters=6, eval_interval=3, eval_iters=1))
    record = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert record["status"] == "finished" and record["started"] <= record["updated"] == record["ended"]
    assert record["config"]["max_iters"] == 6 and record["config"]["model"]["vocab_size"] > 10
    assert record["command"] and record["cwd"]
    data = record["data"]
    assert (data["source"], data["reviews"], data["layout"]) == ("synthetic", 400, "review")
    assert data["split"]["seed"] == 1337 and data["split"]["val"]["reviews"] == 40
    assert "class balance" in data["balance"]
    assert data["vocab_size"] == record["config"]["model"]["vocab_size"]
    assert record["versions"]["torch"] == torch.__version__ and "extension" in record["versions"]
    assert record["backend"]["requested"] == "auto" and record["backend"]["resolved"] in ("reference", "sdpa", "cpp")
    assert record["sampler"] in ("cached", "reference") and record["threads"]["torch"] == torch.get_num_threads()
    assert record["iter"] == 6 and record["losses"]["val"] == pytest.approx(result["val_loss"])
    assert record["best_val_loss"] == pytest.approx(result["best_val_loss"]) and record["resumes"] == []
    assert [s["sentiment"] for s in record["samples"]] == ["pos", "neg"]
    started = record["started"]
    train(tiny_cfg(review_data_dir, tmp_path, max_iters=9, eval_interval=3, eval_iters=1, resume=True))
    record = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert record["started"] == started and record["iter"] == 9 and record["status"] == "finished"
    assert [r["iter"] for r in record["resumes"]] == [6]


@pytest.mark.parametrize("layout", ["review", "book"])
@pytest.mark.parametrize("sampler", ["reference", "auto"])
def test_each_evaluation_prints_a_sample_per_sentiment(layout, sampler, review_data_dir, book_data_dir, tmp_path,
                                                       capsys, monkeypatch):
    if sampler == "reference":  # as where mingpt._C is not built
        monkeypatch.setattr(state, "cached_sampler_unavailable_reason", lambda model: "not built")
    data_dir = review_data_dir if layout == "review" else book_data_dir
    train(tiny_cfg(data_dir, tmp_path, max_iters=0, eval_iters=1))  # a model that has never seen a token
    lines = capsys.readouterr().out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("iter 0: train loss")))
    assert lines[at + 1].startswith("  [pos] ") and lines[at + 2].startswith("  [neg] ")
    record = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert record["sampler"] == ("reference" if sampler == "reference" else record["sampler"])
    assert [f"  [{s['sentiment']}] {' '.join(s['text'].split())}" for s in record["samples"]] == lines[at + 1:at + 3]
    train(tiny_cfg(data_dir, tmp_path / "quiet", max_iters=0, eval_iters=1, eval_sample_tokens=0))
    assert "  [pos]" not in capsys.readouterr().out


def test_samples_leave_the_training_random_streams_alone(book_data_dir, tmp_path):
    """With dropout on, training draws from torch's global RNG at every step: the samples must not."""
    runs = {}
    for tokens in (0, 24):
        cfg = tiny_cfg(book_data_dir, tmp_path / str(tokens), max_iters=6, eval_interval=2, eval_iters=1,
                       eval_sample_tokens=tokens)
        cfg.model.dropout = 0.2
        runs[tokens] = train(cfg)
    assert runs[0]["val_loss"] == runs[24]["val_loss"]
    a, b = load_checkpoint(str(tmp_path / "0")), load_checkpoint(str(tmp_path / "24"))
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])


def test_tensorboard_gets_the_samples_as_text(book_data_dir, tmp_path, monkeypatch):
    written = []

    class Writer:
        def add_text(self, tag, text, step):
            written.append((tag, step))

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(state, "open_tensorboard", lambda cfg: Writer())
    train(tiny_cfg(book_data_dir, tmp_path, max_iters=4, eval_interval=2, eval_iters=1, tensorboard=True))
    assert written == [("samples/pos", 2), ("samples/neg", 2), ("samples/pos", 4), ("samples/neg", 4)]
