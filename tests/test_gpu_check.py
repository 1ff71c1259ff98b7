"""The GPU check's CPU side (benchmarks/gpu_check.py), so that it cannot rot between GPU days: what it
runs, how it reads pytest's report and the op-error log, the summary of a recorded run, and its exit code
where there is no GPU."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import gpu_check

ROOT = pathlib.Path(__file__).resolve().parent.parent

RECORDED = ROOT / "tests" / "gpu_check_recorded.json"


def test_every_test_file_with_a_gpu_mark_is_run_by_the_check():
    marked = {f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")
              if re.search(r"pytest\.mark\.(cuda|triton)\b", path.read_text(encoding="utf-8"))}
    assert marked == set(gpu_check.GPU_TEST_FILES)


def test_the_check_runs_every_step_within_eight_minutes():
    assert set(gpu_check.TIME_LIMITS) == set(gpu_check.STEPS) == set(gpu_check.STEP_FUNCTIONS)
    assert sum(gpu_check.TIME_LIMITS.values()) <= 8 * 60


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_without_a_gpu_it_says_so_and_exits_with_its_own_code(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == gpu_check.NO_GPU != 1
    assert "no CUDA GPU here" in result.stderr
    assert not os.listdir(tmp_path)


def test_unknown_flags_are_usage_errors():
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--stepz", "build"])
    assert exit_.value.code == 2


def test_junit_report_counts_and_failures(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text("""<?xml version="1.0"?><testsuites><testsuite>
      <testcase classname="tests.test_a" name="test_ok"/>
      <testcase classname="tests.test_a" name="test_skip"><skipped message="no"/></testcase>
      <testcase classname="tests.test_b" name="test_bad[fp16]"><failure message="AssertionError: error 1e-2 &gt; 4e-3&#10;second line">trace</failure></testcase>
      <testcase classname="tests.test_c" name="test_broken"><error message="fixture failed"/></testcase>
    </testsuite></testsuites>""", encoding="utf-8")
    counts, failures = gpu_check.read_junit(str(report))
    assert counts == {"passed": 1, "failed": 2, "skipped": 1}
    assert failures == ["tests.test_b::test_bad[fp16]: AssertionError: error 1e-2 > 4e-3",
                        "tests.test_c::test_broken: fixture failed"]


def test_largest_error_per_backend_and_dtype_is_relative_to_its_tolerance(tmp_path):
    log = tmp_path / "op_errors.jsonl"
    entries = [("triton", "fp16", "layer_norm", 1e-3, 4e-3), ("triton", "fp16", "causal_attention", 3e-3, 4e-3),
               ("triton", "fp32", "cross_entropy", 2e-7, 1e-5), ("triton", "bf16", "bias_gelu", 2e-3, 2 ** -6)]
    log.write_text("".join(json.dumps({"backend": b, "dtype": d, "op": op, "tensor": "y", "error": e, "tol": t}) + "\n"
                           for b, d, op, e, t in entries), encoding="utf-8")
    worst = gpu_check.largest_errors(str(log))
    assert [(e["dtype"], e["op"]) for e in worst] == [("bf16", "bias_gelu"), ("fp16", "causal_attention"),
                                                       ("fp32", "cross_entropy")]


def test_summary_of_a_recorded_run(capsys):
    assert gpu_check.main(["--summary", str(RECORDED)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(RECORDED.read_text(encoding="utf-8"))
    assert printed.startswith(f"GPU check, {record['date']}: gpu {record['environment']['gpu']}")
    for step in record["steps"]:
        assert re.search(rf"^\| {step['step']} \| {'pass' if step['ok'] else 'FAIL'} \|", printed, re.MULTILINE)
    assert "| task | backend | dtype | batch | tokens/s | x reference | note |" in printed
    assert "| sample | cached | float32 | 64 | 5,003 | 0.63 | 60 new tokens, guidance 2 |" in printed


def test_synthetic_reviews_are_distinct_and_of_both_sentiments():
    reviews = gpu_check.synthetic_reviews(100)
    assert len({r.text for r in reviews}) == 100
    assert {r.sentiment for r in reviews} == {"pos", "neg"}
