"""The command-line entry points, run as a user runs them."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import NEGATIVE, POSITIVE
from mingpt import sampling
from mingpt.config import GPTConfig, TrainConfig


def run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CSV -> prepare -> train run of the tiny preset; returns (data_dir, out_dir)."""
    root = tmp_path_factory.mktemp("cli")
    rows = [f"{p}{i}。,1" for i, p in enumerate(POSITIVE * 20)] + [f"{n}{i}！,0" for i, n in enumerate(NEGATIVE * 20)]
    (root / "reviews.csv").write_text("review,sentiment\n" + "\n".join(rows) + "\n", encoding="utf-8")
    data_dir, out_dir = str(root / "data"), str(root / "out")
    prepared = run("mingpt.prepare", "--csv", str(root / "reviews.csv"), "--data_dir", data_dir, "--block_size", "32")
    assert "kept 340 reviews" in prepared.stdout and "vocab" in prepared.stdout
    run("mingpt.train", "--preset", "tiny", "--data_dir", data_dir, "--out_dir", out_dir,
        "--max_iters", "40", "--eval_interval", "20", "--progress", "false")
    return data_dir, out_dir


def test_train_writes_checkpoint_metrics_and_plot(trained):
    _, out_dir = trained
    assert sorted(f for f in os.listdir(out_dir) if not f.startswith(".")) == ["best.pt", "ckpt.pt", "loss.png",
                                                                             "metrics.csv", "run.json"]


def test_a_reused_out_dir_is_refused_then_overwritten_from_the_command_line(trained, tmp_path):
    data_dir, out_dir = trained
    copy = tmp_path / "out"
    shutil.copytree(out_dir, copy)
    before = {name: (copy / name).read_bytes() for name in os.listdir(copy)}
    command = ("mingpt.train", "--preset", "tiny", "--data_dir", data_dir, "--out_dir", str(copy), "--max_iters", "2",
               "--eval_interval", "2", "--eval_iters", "1", "--progress", "false")
    refused = run(*command, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith(f"train: error: {copy} already holds a run (iter 40, val loss ")
    assert "--resume" in refused.stderr and "--out_dir NEW_DIR" in refused.stderr and "--overwrite" in refused.stderr
    assert {name: (copy / name).read_bytes() for name in os.listdir(copy)} == before
    replaced = run(*command, "--overwrite")
    (moved,) = os.listdir(copy / "previous")
    assert f"moved the earlier run in {copy} to {copy / 'previous' / moved}" in replaced.stdout
    assert {name: (copy / "previous" / moved / name).read_bytes() for name in before} == before
    assert re.search(r"iter 2: train loss .*\n  \[pos\] .*\n  \[neg\] ", replaced.stdout)


def test_sample_prints_one_review_per_line(trained):
    _, out_dir = trained
    result = run("mingpt.sample", "--ckpt", out_dir, "--start", "好看", "--num_samples", "4",
                 "--max_new_tokens", "20", "--seed", "1", "--verbose")
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.split("] ", 1)[1].startswith("好看") for line in lines)
    assert all(line.startswith(("[pos] ", "[neg] ")) for line in lines)
    assert "sampler:" in result.stderr
    again = run("mingpt.sample", "--ckpt", out_dir, "--start", "好看", "--num_samples", "4",
                "--max_new_tokens", "20", "--seed", "1", "--verbose")
    assert again.stdout == result.stdout


def test_sample_sentiment_choice_is_used(trained):
    _, out_dir = trained
    result = run("mingpt.sample", "--ckpt", out_dir, "--start", "难看", "--sentiment", "neg",
                 "--num_samples", "3", "--max_new_tokens", "10", "--verbose")
    assert all(line.startswith("[neg] 难看") for line in result.stdout.splitlines())


def test_fine_tune_from_the_command_line(trained, tmp_path):
    data_dir, out_dir = trained
    out = str(tmp_path / "ft")
    result = run("mingpt.train", "--preset", "tiny", "--data_dir", data_dir, "--out_dir", out,
                 "--init_from", os.path.join(out_dir, "best.pt"), "--max_iters", "4", "--eval_interval", "2",
                 "--progress", "false")
    assert f"fine-tuning from {os.path.join(out_dir, 'best.pt')}" in result.stdout + result.stderr
    assert os.path.exists(os.path.join(out, "ckpt.pt"))


def test_evaluate_reports_every_metric(trained, tmp_path):
    data_dir, out_dir = trained
    judge_csv = tmp_path / "judge.csv"
    judge_csv.write_text("review,sentiment\n" + "".join(f"{p},1\n" for p in POSITIVE)
                         + "".join(f"{n},0\n" for n in NEGATIVE), encoding="utf-8")
    report_path = tmp_path / "report.json"
    result = run("mingpt.evaluate", "--ckpt", out_dir, "--data_dir", data_dir, "--num_samples", "6",
                 "--max_new_tokens", "12", "--judge_train", str(judge_csv), "--judge_test", str(judge_csv),
                 "--pretrained_on", data_dir, "--json", str(report_path))
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert [(p["start"], p["sentiment"]) for p in report["prompts"]] == [("好看", "pos"), ("难看", "neg")]
    for prompt in report["prompts"]:
        for side in ("generated", "real_held_out"):
            stats = prompt[side]
            assert all(0.0 <= stats[m] <= 1.0 for m in ("sentiment_accuracy", "novelty", "distinct_1", "distinct_2"))
    assert report["judge"]["train"] == str(judge_csv) and 0.5 <= report["judge"]["test_accuracy"] <= 1.0
    assert "validation loss" in result.stdout and "distinct_2" in result.stdout
    generator_csv = os.path.join(os.path.dirname(data_dir), "reviews.csv")
    refused = run("mingpt.evaluate", "--ckpt", out_dir, "--data_dir", data_dir, "--judge_train", generator_csv,
                  check=False)
    assert refused.returncode == 2 and "generator's own training data" in refused.stderr


def test_unknown_prompt_character_is_a_clear_error(trained):
    _, out_dir = trained
    result = run("mingpt.sample", "--ckpt", out_dir, "--start", "好看🙂", check=False)
    assert result.returncode == 2 and "'🙂'" in result.stderr and "Traceback" not in result.stderr


def test_missing_and_corrupt_checkpoint(tmp_path):
    result = run("mingpt.sample", "--ckpt", str(tmp_path / "nothing"), check=False)
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04garbage")
    result = run("mingpt.sample", "--ckpt", str(tmp_path), check=False)
    assert result.returncode == 2 and "corrupt" in result.stderr


def test_prepare_and_train_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("title,score\nx,1\n", encoding="utf-8")
    result = run("mingpt.prepare", "--csv", str(bad), "--data_dir", str(tmp_path / "d"), check=False)
    assert result.returncode == 2 and "--text_column" in result.stderr and "Traceback" not in result.stderr
    result = run("mingpt.train", "--data_dir", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "o"), check=False)
    assert result.returncode == 2 and "python -m mingpt.prepare" in result.stderr


def test_help_documents_every_option():
    text = run("mingpt.train", "--help").stdout
    options = [f.name for cls in (TrainConfig, GPTConfig) for f in dataclasses.fields(cls) if f.name != "model"]
    assert "init_from" in options and "balance" in options
    for name in options + ["config"]:
        assert f"--{name} " in text, f"train --help lacks --{name}"
    for module in ("mingpt.prepare", "mingpt.sample", "mingpt.bench"):
        assert "--" in run(module, "--help").stdout


def test_bench_writes_json_rows(tmp_path):
    path = tmp_path / "bench.json"
    result = run("mingpt.bench", "--preset", "tiny", "--tasks", "train,sample", "--backends", "reference,sdpa,triton",
                 "--dtypes", "float32", "--rounds", "1", "--steps", "1", "--warmup", "1", "--new_tokens", "4",
                 "--json", str(path))
    rows = json.loads(path.read_text())
    assert {"task", "backend", "dtype", "batch", "tokens_per_s"} <= set(rows[0])
    measured = {(r["task"], r["backend"], r["batch"]) for r in rows if r["tokens_per_s"]}
    assert {("train_step", "reference", 32), ("train_step", "sdpa", 32), ("sample", "reference", 1),
            ("sample", "reference", 10)} <= measured
    assert "train_step" in result.stdout
    if sampling.cached_sampler_unavailable_reason() is None:  # a row per weight format beside its bound
        formats = {(r["backend"], r["dtype"], r["batch"]) for r in rows if r["task"] == "sample" and r["tokens_per_s"]}
        assert {(b, d, n) for b in ("cached", "stream-bound") for d in ("float32", "bf16", "int8")
                for n in (1, 10)} <= formats
        assert "cached int8  batch  1:" in result.stdout and "of its streaming bound" in result.stdout
