"""Training that survives faults: signals, kill -9, NaN, unwritable or full output, several processes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_cfg

from mingpt.checkpoint import load_checkpoint
from mingpt.model import GPT
from mingpt.train.loop import train


def train_command(data_dir, out_dir, *extra):
    return [sys.executable, "-m", "mingpt.train", "--preset", "tiny", "--data_dir", data_dir, "--out_dir",
            str(out_dir), "--progress", "false", "--threads", "1", *extra]


def wait_for(path, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def test_best_and_latest_checkpoints(book_data_dir, tmp_path):
    train(tiny_cfg(book_data_dir, tmp_path, max_iters=30, eval_interval=10))
    latest, best = load_checkpoint(str(tmp_path / "ckpt.pt")), load_checkpoint(str(tmp_path / "best.pt"))
    assert latest["iter_num"] == 30
    assert best["best_val_loss"] == latest["best_val_loss"] <= min(
        float(line.split(",")[2]) for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]) + 1e-4
    assert set(latest["rng"]) == {"torch", "numpy_keys", "numpy_pos", "python"} and "batch_rng" in latest


def test_sigterm_writes_a_checkpoint_and_exits(book_data_dir, tmp_path):
    proc = subprocess.Popen(train_command(book_data_dir, tmp_path, "--max_iters", "100000", "--eval_interval", "5"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "ckpt.pt")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    record = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert record["status"].startswith(f"stopped: SIGTERM at iteration {ckpt['iter_num']}") and record["ended"]
    assert ckpt["iter_num"] >= 5
    result = subprocess.run(train_command(book_data_dir, tmp_path, "--max_iters", str(ckpt["iter_num"] + 2),
                                          "--eval_interval", "5", "--resume", "true"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == ckpt["iter_num"] + 2


def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint(book_data_dir, tmp_path):
    proc = subprocess.Popen(train_command(book_data_dir, tmp_path, "--max_iters", "100000", "--eval_interval", "1",
                                          "--eval_iters", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(tmp_path / "ckpt.pt")
        for delay in (0.013, 0.029, 0.041, 0.057, 0.071):  # land at different points of the write cycle
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGSTOP)
            load_checkpoint(str(tmp_path / "ckpt.pt"))
            assert json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))["status"] == "running"
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.037)
    finally:
        proc.kill()
        proc.wait()
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] >= 1
    record = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))  # whole after a kill -9
    assert record["status"] == "running" and record["ended"] is None and record["iter"] >= 1
    train(tiny_cfg(book_data_dir, tmp_path, max_iters=ckpt["iter_num"] + 1, eval_interval=1, eval_iters=1,
                   resume=True))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    record = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert record["status"] == "finished" and record["iter"] == ckpt["iter_num"] + 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(book_data_dir, tmp_path, monkeypatch):
    train(tiny_cfg(book_data_dir, tmp_path, max_iters=4, eval_interval=4, eval_iters=1))
    good = (tmp_path / "ckpt.pt").read_bytes()
    forward = GPT.forward

    def poisoned(self, idx, targets=None, **packed):
        logits, loss = forward(self, idx, targets, **packed)
        return logits, (loss * float("nan") if self.training and loss is not None else loss)

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="at iteration 4"):
        train(tiny_cfg(book_data_dir, tmp_path, max_iters=8, eval_interval=4, eval_iters=1, resume=True))
    assert (tmp_path / "ckpt.pt").read_bytes() == good
    status = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))["status"]
    assert status.startswith("failed: FloatingPointError: loss became nan at iteration 4")


def test_unwritable_or_full_out_dir_fails_at_start(book_data_dir, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="cannot write to out_dir"):
        train(tiny_cfg(book_data_dir, tmp_path / "a_file" / "out", max_iters=1))
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ValueError, match="MiB free"):
        train(tiny_cfg(book_data_dir, tmp_path / "out", max_iters=1))


@pytest.mark.parametrize("data, options", [
    ("book_data_dir", []),
    ("review_data_dir", ["--pack", "true", "--optimizer", "muon", "--schedule", "wsd", "--ema_decay", "0.9"]),
], ids=["book", "packed-muon-wsd-ema"])
def test_torchrun_two_processes_match_one(data, options, tmp_path, request):
    data_dir = request.getfixturevalue(data)
    common = ["--max_iters", "6", "--eval_interval", "6", "--eval_iters", "1", "--batch_size", "4",
              "--grad_accum", "2", "--dropout", "0", *options]
    single = subprocess.run(train_command(data_dir, tmp_path / "one", *common),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--master_port=29533", *train_command(data_dir, tmp_path / "two", *common)[1:]],
                           capture_output=True, text=True, timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "2 process(es)" in multi.stdout
    one, two = load_checkpoint(str(tmp_path / "one")), load_checkpoint(str(tmp_path / "two"))
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, rtol=1e-5, atol=1e-6)
