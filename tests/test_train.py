import csv
import json
import os

import pytest
import torch

from conftest import tiny_cfg

from mingpt.train import loop as training
from mingpt.train import state
from mingpt.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, load
from mingpt.config import preset_config
from mingpt.runtime import Distributed
from mingpt.train.__main__ import config_from_args
from mingpt.train.loop import train
from mingpt.train.schedule import learning_rate


def test_loss_decreases_and_outputs_are_written(review_data_dir, tmp_path, monkeypatch):
    kept = []
    monkeypatch.setattr(training, "keep_freed_memory", lambda: kept.append(True))
    result = train(tiny_cfg(review_data_dir, tmp_path, max_iters=60, eval_interval=30))
    assert kept == [True]  # malloc keeps what a step frees for the next (mingpt.runtime.keep_freed_memory)
    with open(tmp_path / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iter"]) for r in rows] == [30, 60]
    assert result["val_loss"] < 0.6 * torch.log(torch.tensor(float(result_vocab(review_data_dir)))).item()
    assert os.path.getsize(tmp_path / "loss.png") > 1000
    loaded = load(str(tmp_path))
    model, tokenizer = loaded.model, loaded.tokenizer
    assert tokenizer.vocab_size == model.config.vocab_size


def result_vocab(data_dir):
    return json.load(open(os.path.join(data_dir, "meta.json"), encoding="utf-8"))["vocab_size"]


def test_resume_continues_bitwise(book_data_dir, tmp_path):
    schedule = dict(eval_interval=10, lr_decay_iters=20)
    straight = train(tiny_cfg(book_data_dir, tmp_path / "a", max_iters=20, **schedule))
    train(tiny_cfg(book_data_dir, tmp_path / "b", max_iters=10, **schedule))
    resumed = train(tiny_cfg(book_data_dir, tmp_path / "b", max_iters=20, resume=True, **schedule))
    assert resumed["val_loss"] == straight["val_loss"]
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    losses = [line.split(",")[:3] for line in (tmp_path / "a" / "metrics.csv").read_text().splitlines()]
    assert losses == [line.split(",")[:3] for line in (tmp_path / "b" / "metrics.csv").read_text().splitlines()]
    records = [json.loads((tmp_path / run / "run.json").read_text(encoding="utf-8")) for run in "ab"]
    assert records[0]["samples"] == records[1]["samples"]  # the evaluation samples repeat after a resume
    assert [r["iter"] for r in records[1]["resumes"]] == [10]


def test_resume_refuses_another_model(book_data_dir, tmp_path):
    train(tiny_cfg(book_data_dir, tmp_path, max_iters=2, eval_interval=2, eval_iters=1))
    cfg = tiny_cfg(book_data_dir, tmp_path, max_iters=4, resume=True)
    cfg.model.n_embd = 64
    with pytest.raises(CheckpointError, match="model config"):
        train(cfg)


def test_cosine_schedule():
    cfg = preset_config("tiny")
    cfg.max_iters, cfg.warmup_iters = 100, 10
    assert learning_rate(0, cfg) < learning_rate(9, cfg) < cfg.learning_rate
    assert learning_rate(10, cfg) == pytest.approx(cfg.learning_rate)
    assert learning_rate(55, cfg) == pytest.approx((cfg.learning_rate + cfg.min_lr) / 2)
    assert learning_rate(100, cfg) == cfg.min_lr


def test_config_precedence(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batch_size": 7, "max_iters": 9, "model": {"n_layer": 3}}), encoding="utf-8")
    cfg = config_from_args(["--preset", "demo", "--config", str(path), "--max_iters", "11", "--n_head", "2"])
    assert (cfg.batch_size, cfg.max_iters, cfg.model.n_layer, cfg.model.n_head) == (7, 11, 3, 2)
    assert cfg.model.n_embd == preset_config("demo").model.n_embd
    path.write_text(json.dumps({"batchsize": 7}), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown option 'batchsize'"):
        config_from_args(["--config", str(path)])


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "none.pt"))
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    atomic_torch_save({"weights": torch.zeros(2)}, str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="not a mingpt checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_with_pickle_payload_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "mingpt-checkpoint-v1", "model": Payload()}, "evil.pt")
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint("evil.pt")
    assert not os.path.exists("pwned")


def test_truncated_checkpoint_is_refused(book_data_dir, tmp_path):
    train(tiny_cfg(book_data_dir, tmp_path, max_iters=2, eval_interval=2, eval_iters=1))
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt is truncated or corrupt"):
        load_checkpoint(str(tmp_path / "cut.pt"))


def cpu_grad_scaler(**kwargs):
    """float16's scaler, enabled on the CPU: the CPU cannot train in float16, but the scaler's logic
    (scale, unscale, skip a step with inf gradients, grow and back off) is the same on every device."""
    return lambda dtype, device: torch.amp.GradScaler("cpu", **kwargs)


def test_grad_scaler_skips_steps_with_inf_gradients(book_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(state, "make_grad_scaler", cpu_grad_scaler(init_scale=2.0 ** 16))
    run = state.set_up(tiny_cfg(book_data_dir, tmp_path, max_iters=40), Distributed(), torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    overflow = run.model.lm_head.weight.register_hook(lambda grad: grad * float("inf"))
    loss, _ = training.optimizer_step(run)
    assert torch.isfinite(loss)
    assert all(torch.equal(before[name], p) for name, p in run.model.named_parameters())
    adamw_state = run.optimizers[0].state.values()
    assert all(s["step"] == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in adamw_state), \
        "AdamW stepped on inf gradients"
    assert run.scaler.get_scale() == 2.0 ** 15 and run.it == 1
    overflow.remove()
    training.optimizer_step(run)
    assert all(s["step"] == 1 for s in run.optimizers[0].state.values())
    assert not torch.equal(before["transformer.wte.weight"], run.model.lm_head.weight)
    assert run.scaler.get_scale() == 2.0 ** 15


def test_resume_restores_the_grad_scaler(book_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(state, "make_grad_scaler", cpu_grad_scaler(init_scale=2.0 ** 10, growth_interval=3))
    schedule = dict(eval_interval=10, lr_decay_iters=20)
    train(tiny_cfg(book_data_dir, tmp_path / "a", max_iters=20, **schedule))
    train(tiny_cfg(book_data_dir, tmp_path / "b", max_iters=10, **schedule))
    assert load_checkpoint(str(tmp_path / "b"))["grad_scaler"]["scale"] == 2.0 ** 13  # grew at steps 3, 6, 9
    train(tiny_cfg(book_data_dir, tmp_path / "b", max_iters=20, resume=True, **schedule))
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    assert a["grad_scaler"] == b["grad_scaler"] and a["grad_scaler"]["scale"] == 2.0 ** 16
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_float32_and_bfloat16_runs_have_no_scaler_state(book_data_dir, tmp_path):
    train(tiny_cfg(book_data_dir, tmp_path, max_iters=2, eval_interval=2))
    assert load_checkpoint(str(tmp_path))["grad_scaler"] == {}


def test_averaged_weights_are_measured_and_kept_in_best(review_data_dir, tmp_path):
    train(tiny_cfg(review_data_dir, tmp_path, max_iters=20, eval_interval=10, ema_decay=0.8))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv", encoding="utf-8")))
    assert all(float(r["unaveraged_val_nats_per_char"]) != float(r["val_nats_per_char"]) for r in rows)
    latest, best = load_checkpoint(str(tmp_path / "ckpt.pt")), load_checkpoint(str(tmp_path / "best.pt"))
    averaged = dict(zip([n for n, _ in load(str(tmp_path / "ckpt.pt")).model.named_parameters()], latest["ema"]))
    assert not torch.equal(averaged["transformer.wte.weight"], latest["model"]["transformer.wte.weight"])
    assert best["iter_num"] == latest["iter_num"] == 20  # the last evaluation was the best: best.pt is the average
    for name, weights in averaged.items():
        assert torch.equal(best["model"][name], weights), name
