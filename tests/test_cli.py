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
from mingpt.sample import compiled
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
    judge = ["--judge_train", str(judge_csv), "--judge_test", str(judge_csv)]
    result = run("mingpt.evaluate", "--ckpt", out_dir, "--data_dir", data_dir, "--num_samples", "6",
                 "--max_new_tokens", "12", *judge, "--prompts", "好看:pos,难看:neg,剧情", "--guidance", "2",
                 "--pretrained_on", data_dir, "--json", str(report_path))
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert [(p["start"], p["sentiment"]) for p in report["prompts"]] == [
        ("好看", "pos"), ("难看", "neg"), ("剧情", "pos"), ("剧情", "neg")]
    for prompt in report["prompts"]:
        assert all(text.startswith(prompt["start"]) for text in prompt["examples"])
        for side in ("generated", "real_held_out"):
            stats = prompt[side]
            assert all(0.0 <= stats[m] <= 1.0
                       for m in ("sentiment_accuracy", "novelty", "exact_copies", "distinct_1", "distinct_2"))
            assert 0 < stats["naturalness"] < 20  # nats per character under the judge set's n-gram model
    assert report["judge"]["train"] == str(judge_csv) and 0.5 <= report["judge"]["test_accuracy"] <= 1.0
    assert str(judge_csv) in report["judge"]["naturalness"]
    assert "validation loss" in result.stdout and "distinct_2" in result.stdout and "naturalness" in result.stdout
    assert "nats per character given the sentiment" in result.stdout and 0 < report["val_nats_per_char"] < 10
    generator_csv = os.path.join(os.path.dirname(data_dir), "reviews.csv")
    refused = run("mingpt.evaluate", "--ckpt", out_dir, "--data_dir", data_dir, "--judge_train", generator_csv,
                  "--prompts", "好看", check=False)
    assert refused.returncode == 2 and "generator's own training data" in refused.stderr


def test_evaluate_sweeps_guidance_by_temperature_and_names_a_prompt_outside_the_vocabulary(trained, tmp_path):
    data_dir, out_dir = trained
    judge_csv = tmp_path / "judge.csv"
    judge_csv.write_text("review,sentiment\n" + "".join(f"{p},1\n" for p in POSITIVE)
                         + "".join(f"{n},0\n" for n in NEGATIVE), encoding="utf-8")
    judge = ["--judge_train", str(judge_csv), "--judge_test", str(judge_csv)]
    report_path = tmp_path / "sweep.json"
    result = run("mingpt.evaluate", "--ckpt", out_dir, "--data_dir", data_dir, "--num_samples", "4",
                 "--max_new_tokens", "8", *judge, "--prompts", "好看", "--sweep", "guidance=1,2.5",
                 "--sweep", "temperature=0.7,1", "--json", str(report_path))
    rows = json.loads(report_path.read_text(encoding="utf-8"))["sweep"]
    assert [(r["guidance"], r["temperature"]) for r in rows] == [(1, 0.7), (1, 1), (2.5, 0.7), (2.5, 1)]
    assert all(-1 <= r["min_sentiment_margin"] <= 1 and 0 <= r["min_novelty"] <= 1 for r in rows)
    assert [(p["start"], p["sentiment"]) for p in rows[0]["pairs"]] == [("好看", "pos"), ("好看", "neg")]
    assert "min sentiment margin" in result.stdout and len(result.stdout.splitlines()) == 5
    assert result.stdout.split()[:2] == ["guidance", "temperature"]  # each swept name a column of its own
    # the default prompt set holds characters this small vocabulary lacks
    refused = run("mingpt.evaluate", "--ckpt", out_dir, "--data_dir", data_dir, *judge, check=False)
    assert refused.returncode == 2 and "prompt '这部电影'" in refused.stderr and "--prompts" in refused.stderr
    refused = run("mingpt.evaluate", "--ckpt", out_dir, "--data_dir", data_dir, *judge, "--sweep", "guidance=1,x",
                  "--sweep", "temperature=1", check=False)
    assert refused.returncode == 2 and "--sweep 'guidance=1,x'" in refused.stderr


def test_sample_prompts_file_stop_strings_and_controls(trained, tmp_path):
    _, out_dir = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("pos\t好看\nneg\t难看\n\n剧情\n", encoding="utf-8")
    result = run("mingpt.sample", "--ckpt", out_dir, "--prompts", str(prompts), "--num_samples", "3",
                 "--max_new_tokens", "30", "--seed", "2", "--verbose", "--stop", "。", "--stop", "！",
                 "--guidance", "3", "--repetition_penalty", "1.2", "--no_repeat_ngram_size", "3")
    lines = result.stdout.splitlines()
    assert len(lines) == 9
    assert all(line.startswith("[pos] 好看") for line in lines[:3])
    assert all(line.startswith("[neg] 难看") for line in lines[3:6])
    assert all(line.split("] ", 1)[1].startswith("剧情") for line in lines[6:])
    for line in lines:
        text = line.split("] ", 1)[1]
        ends = [i for i in (text.find("。"), text.find("！")) if i >= 0]
        assert not ends or min(ends) == len(text) - 1, f"{text!r} runs past its first stop string"
    assert any(line.endswith(("。", "！")) for line in lines)


@pytest.mark.parametrize("flags, message", [
    (["--guidance", "-1"], "guidance must be >= 0"),
    (["--repetition_penalty", "0"], "repetition_penalty must be > 0"),
    (["--guidance_tokens", "-1"], "guidance_tokens must be an integer >= 0"),
    (["--guidance_after", "-1"], "guidance_after must be >= 0"),
    (["--no_repeat_ngram_size", "-2"], "no_repeat_ngram_size"),
    (["--stop", ""], "stop strings must be non-empty"),
    (["--prompts", "PROMPTS", "--interactive"], "--prompts and --interactive"),
])
def test_bad_sampling_controls_are_clear_errors(trained, tmp_path, flags, message):
    _, out_dir = trained
    flags = [str(tmp_path / "p.txt") if f == "PROMPTS" else f for f in flags]
    (tmp_path / "p.txt").write_text("好看\n", encoding="utf-8")
    result = run("mingpt.sample", "--ckpt", out_dir, "--start", "好看", "--max_new_tokens", "4", *flags, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("content, message", [
    ("好看\nmeh\t难看\n", "line 2: the sentiment before the tab must be pos, neg or auto, got 'meh'"),
    ("好看\n\npos\t好🙂\n", "line 3: "),
    (None, "No such file"),
])
def test_a_bad_prompts_file_names_the_line(trained, tmp_path, content, message):
    _, out_dir = trained
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = run("mingpt.sample", "--ckpt", out_dir, "--prompts", str(path), check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


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


def test_bench_refuses_an_unknown_optimizer_by_name():
    refused = run("mingpt.bench", "--optimizers", "muon,adam", check=False)
    assert refused.returncode == 2 and "unknown adam; choose from adamw, muon" in refused.stderr


def test_bench_times_the_steps_own_matrix_products_against_the_peak(tmp_path):
    path = tmp_path / "bench.json"
    result = run("mingpt.bench", "--preset", "tiny", "--tasks", "matmul", "--dtypes", "float32", "--json", str(path))
    rows = {r["task"]: r for r in json.loads(path.read_text())}
    assert set(rows) == {"matmul_2048", "matmul_step"}
    step = rows["matmul_step"]
    assert step["batch"] == 32 and step["tokens_per_s"] > 0 and step["mfu"] > 0
    assert "matrix products alone" in step["note"] and "matmul_step" in result.stdout


def test_bench_writes_json_rows(tmp_path):
    path = tmp_path / "bench.json"
    result = run("mingpt.bench", "--preset", "tiny", "--tasks", "train,sample", "--backends", "reference,sdpa,triton",
                 "--dtypes", "float32", "--rounds", "1", "--steps", "1", "--warmup", "1", "--new_tokens", "4",
                 "--optimizers", "muon", "--json", str(path))
    rows = json.loads(path.read_text())
    assert {"task", "backend", "dtype", "batch", "tokens_per_s"} <= set(rows[0])
    measured = {(r["task"], r["backend"], r["batch"]) for r in rows if r["tokens_per_s"]}
    assert {(f"train_step:{layout}", backend, 32) for layout in ("padded", "packed") for backend in ("reference", "sdpa")
            } | {("sample", "reference", 1), ("sample", "reference", 10)} <= measured
    share = {r["task"]: float(r["note"].split()[2].rstrip("%")) for r in rows if r["task"].startswith("train_step:")
             and r["tokens_per_s"]}
    assert share["train_step:packed"] > 90 > share["train_step:padded"]  # the embedded corpus' review lengths
    assert all(r["note"].endswith("; muon") for r in rows if r["task"].startswith("train_step:") and r["tokens_per_s"])
    assert "train_step:packed" in result.stdout
    if compiled.cached_sampler_unavailable_reason() is None:  # a row per weight format beside its bound
        formats = {(r["backend"], r["dtype"], r["batch"]) for r in rows if r["task"] == "sample" and r["tokens_per_s"]}
        assert {(b, d, n) for b in ("cached", "stream-bound") for d in ("float32", "bf16", "int8")
                for n in (1, 10)} <= formats
        assert "cached int8  batch  1:" in result.stdout and "of its streaming bound" in result.stdout
