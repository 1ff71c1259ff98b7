"""The GPU acceptance run: `make gpu-check`, or `python benchmarks/gpu_check.py --out DIR`.

On a machine with a CUDA GPU it runs, in order, each step in a process of its own under a time limit:

  build        the device, driver, torch, CUDA and Triton versions; mingpt installed in place (pip install
               -e, no index, no dependencies: nothing is downloaded) with mingpt._C built for this GPU's
               architecture against the torch already installed
  tests        every test marked `cuda` or `triton` (pytest -m "cuda or triton" over GPU_TEST_FILES): the
               Triton kernels forward and backward against the reference in fp32, fp16 and bf16 on the odd
               shapes and on packed rows, the CUDA decode against GPT.forward, generate on CUDA for every
               sampler, the training-convergence tests; the largest error of each backend and dtype is kept
  convergence  a small GPT trains CONVERGENCE_STEPS steps on `triton` and on `reference` from the same
               seed, in fp32 (padded and packed rows) and bf16 autocast, on reviews this script makes;
               the loss curves must stay within CONVERGENCE_BOUNDS
  bench        python -m mingpt.bench --device cuda: the training step per backend and dtype, decoding per
               sampler at batch 1 and 64 (JSON and a markdown table)

then prints one summary table. Everything it needs travels with the source tree: no network, no
data folder. It writes DIR/gpu_check.json (and each step's files) and exits 0 when every step passed,
1 when one failed, and NO_GPU (3) at once where torch sees no CUDA device. `--summary FILE` prints the
table of a recorded gpu_check.json.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_GPU = 3
STEPS = ("build", "tests", "convergence", "bench")
# Seconds each step may take: the whole run fits 8 minutes of an H100/H200-class machine after start-up.
TIME_LIMITS = {"build": 150, "tests": 180, "convergence": 60, "bench": 90}
GPU_TEST_FILES = ("tests/test_cuda.py", "tests/test_triton_kernels.py", "tests/test_fused_ops.py",
                  "tests/test_dropout.py", "tests/test_triton_convergence.py", "tests/test_sampler.py")
CONVERGENCE_STEPS = 30
# Largest |loss(triton) - loss(reference)| over the steps. fp32: tests/train_check.py's per-step bound (5e-5,
# ~100 ulps of a loss near 4; observed 4.8e-7 on an H200). bf16: both runs round their matmuls to bf16 alike
# and differ only in the fused ops' rounding (observed 9.1e-4); a wrong kernel moves the loss by tenths.
CONVERGENCE_BOUNDS = {"fp32 padded": 5e-5, "fp32 packed": 5e-5, "bf16 padded": 1e-2}
BENCH_ARGS = ("--tasks", "matmul,train,sample", "--backends", "reference,sdpa,triton", "--dtypes",
              "float32,bfloat16", "--sample_batches", "1,64", "--rounds", "3", "--steps", "5")


def child_env(out_dir: str) -> dict:
    return {**os.environ, "MINGPT_OP_ERROR_LOG": os.path.join(out_dir, "op_errors.jsonl"), "PYTHONUNBUFFERED": "1"}


def run_step(name: str, out_dir: str, limit: float) -> dict:
    """Run `--step name` in a child process under its time limit; its result is the JSON it wrote."""
    started = time.perf_counter()
    command = [sys.executable, os.path.abspath(__file__), "--step", name, "--out", out_dir]
    try:
        code = subprocess.run(command, cwd=ROOT, env=child_env(out_dir), timeout=limit).returncode
    except subprocess.TimeoutExpired:
        return {"step": name, "ok": False, "seconds": limit, "detail": f"stopped after its {limit:.0f} s limit"}
    path = os.path.join(out_dir, f"{name}.json")
    result = read_json(path) if os.path.isfile(path) else {"ok": False, "detail": f"exit {code}, no {path}"}
    return {"step": name, "seconds": round(time.perf_counter() - started, 1), **result,
            "ok": bool(result.get("ok")) and code == 0}


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)


def command_output(command, timeout=30) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({type(e).__name__})"
    return (result.stdout or result.stderr).strip()


# ---------------------------------------------------------------------------- the steps (child processes)

def step_build(out_dir: str) -> dict:
    import torch
    major, minor = torch.cuda.get_device_capability()
    environment = {"gpu": torch.cuda.get_device_name(), "capability": f"{major}.{minor}",
                   "driver": command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                   "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                   "triton": module_version("triton")}
    print("environment:", json.dumps(environment), flush=True)
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}", "MINGPT_REQUIRE_EXTENSION": "1",
           "MAX_JOBS": str(os.cpu_count() or 4)}
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                            "-e", "."], cwd=ROOT, env=env, capture_output=True, text=True)
    with open(os.path.join(out_dir, "build.log"), "w", encoding="utf-8") as f:
        f.write(build.stdout + build.stderr)
    if build.returncode != 0:
        lines = [line for line in (build.stdout + build.stderr).splitlines() if "error" in line.lower()]
        return {"ok": False, "environment": environment, "detail": (lines or ["pip install -e . failed"])[0][:300]}
    info = command_output([sys.executable, "-c", "import json, mingpt._C as c; print(json.dumps(c.build_info()))"])
    built = json.loads(info) if info.startswith("{") else {"error": info[-300:]}
    ok = built.get("cuda") is True
    return {"ok": ok, "environment": environment, "build_info": built,
            "detail": f"mingpt._C for sm_{major}{minor}" + ("" if ok else f": not a CUDA build ({built})")}


def module_version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError as e:
        return f"not importable ({e})"


def step_tests(out_dir: str) -> dict:
    junit, log = os.path.join(out_dir, "junit.xml"), os.path.join(out_dir, "tests.log")
    with open(log, "w", encoding="utf-8") as f:
        subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda or triton", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={junit}", *test_workers(), *GPU_TEST_FILES], cwd=ROOT, stdout=f,
                       stderr=subprocess.STDOUT)
    with open(log, encoding="utf-8") as f:
        print("".join(f.readlines()[-15:]), flush=True)  # pytest's short summary; the whole log is in tests.log
    counts, failures = read_junit(junit) if os.path.isfile(junit) else ({}, ["pytest wrote no report"])
    errors_path = os.path.join(out_dir, "op_errors.jsonl")
    largest = largest_errors(errors_path) if os.path.isfile(errors_path) else []
    ok = not failures and counts.get("passed", 0) > 0
    return {"ok": ok, "counts": counts, "failures": failures[:20], "largest_errors": largest,
            "detail": ", ".join(f"{n} {k}" for k, n in counts.items())}


def test_workers() -> list:
    """pytest-xdist's flags where it is installed: Triton compiles each kernel variant on first use, one
    process at a time, so the tests compile faster side by side."""
    if importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(min(8, os.cpu_count() or 1))]


def read_junit(path: str):
    """({passed, failed, skipped}: counts, ["test: first line of its failure"]) of a pytest JUnit report."""
    counts, failures = {"passed": 0, "failed": 0, "skipped": 0}, []
    for case in ET.parse(path).getroot().iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            counts["failed"] += 1
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failures.append(f"{case.get('classname')}::{case.get('name')}: {(message or [''])[0][:200]}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failures


def largest_errors(path: str) -> list:
    """The largest scaled error of each backend and dtype in an op-error log, with its op and tolerance."""
    worst = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            key = (entry["backend"], entry["dtype"])
            if key not in worst or entry["error"] / entry["tol"] > worst[key]["error"] / worst[key]["tol"]:
                worst[key] = entry
    return sorted(worst.values(), key=lambda e: (e["backend"], e["dtype"]))


def synthetic_reviews(n: int, seed: int = 0):
    """Short reviews of both sentiments from phrases that say it, numbered so that none repeats."""
    from mingpt.data.corpus import Review
    positive = ["好看", "很好看", "精彩", "喜欢", "感动", "推荐", "演技很好", "剧情不错", "值得一看", "配乐动人"]
    negative = ["难看", "无聊", "失望", "烂片", "浪费时间", "剧情拖沓", "演技很差", "不推荐", "太假了"]
    rng = random.Random(seed)
    reviews = []
    for i in range(n):
        phrases = positive if i % 2 == 0 else negative
        text = "，".join(rng.choice(phrases) for _ in range(rng.randint(1, 6))) + rng.choice("。！")
        reviews.append(Review(f"{text}{i}", "pos" if i % 2 == 0 else "neg"))
    return reviews


def train_curve(backend: str, data, config, batches, dtype: str) -> list:
    import torch
    from mingpt import GPT
    from mingpt.runtime import autocast_context
    torch.manual_seed(1234)
    device = torch.device("cuda")
    model = GPT(config, backend=backend).to(device)
    [optimizer] = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.99))
    losses = []
    for x, y, starts in batches:
        with autocast_context(dtype, device):
            _, loss = model(x.to(device), y.to(device), starts=None if starts is None else starts.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def step_convergence(out_dir: str) -> dict:
    import tempfile
    import torch
    from mingpt import GPTConfig
    from mingpt.data.tokens import TokenData, write_data_dir
    data_dir = tempfile.mkdtemp(prefix="gpu-check-data-")
    write_data_dir(synthetic_reviews(2000), {}, data_dir, block_size=32, source="gpu_check synthetic reviews")
    data = TokenData(data_dir)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=42, block_size=32, vocab_size=data.tokenizer.vocab_size)
    generator = torch.Generator().manual_seed(5678)
    padded = [(*data.get_batch("train", 16, 32, generator), None) for _ in range(CONVERGENCE_STEPS)]
    data.set_packing(True)
    packed = [data.load_packed_batch(data.plan_packed_batch(16, generator)) for _ in range(CONVERGENCE_STEPS)]
    runs = {"fp32 padded": (padded, "float32"), "fp32 packed": (packed, "float32"), "bf16 padded": (padded, "bfloat16")}
    curves, ok = {}, True
    for name, (batches, dtype) in runs.items():
        triton, reference = (train_curve(b, data, config, batches, dtype) for b in ("triton", "reference"))
        gap = max(abs(a - b) for a, b in zip(triton, reference))
        learned = reference[-1] < reference[0] - 0.5
        ok &= gap <= CONVERGENCE_BOUNDS[name] and learned
        curves[name] = {"triton": triton, "reference": reference, "max_gap": gap, "bound": CONVERGENCE_BOUNDS[name]}
        print(f"{name}: loss {reference[0]:.4f} -> {reference[-1]:.4f} (reference), max |triton - reference| "
              f"{gap:.2e} (bound {CONVERGENCE_BOUNDS[name]:g})", flush=True)
    detail = "; ".join(f"{name} max gap {c['max_gap']:.1e}" for name, c in curves.items())
    return {"ok": ok, "steps": CONVERGENCE_STEPS, "curves": curves, "detail": detail}


def step_bench(out_dir: str) -> dict:
    import csv
    reviews = os.path.join(out_dir, "bench_reviews.csv")
    with open(reviews, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("review", "sentiment")] + [(r.text, int(r.sentiment == "pos"))
                                                             for r in synthetic_reviews(4000, seed=1)])
    bench_json, bench_md = os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.md")
    code = subprocess.run([sys.executable, "-m", "mingpt.bench", "--device", "cuda", "--reviews", reviews,
                           *BENCH_ARGS, "--json", bench_json, "--markdown", bench_md], cwd=ROOT).returncode
    rows = read_json(bench_json) if os.path.isfile(bench_json) else []
    measured = [r for r in rows if r.get("tokens_per_s")]
    failed = [f"{r['task']} {r['backend']} {r['dtype']}: {r['note']}" for r in rows if "failed here" in r["note"]]
    return {"ok": code == 0 and bool(measured) and not failed, "rows": rows, "failed": failed,
            "detail": f"{len(measured)} rows measured" + (f", {len(failed)} failed" if failed else "")}


STEP_FUNCTIONS = {"build": step_build, "tests": step_tests, "convergence": step_convergence, "bench": step_bench}


# ---------------------------------------------------------------------------- the summary

def key_bench_rows(rows) -> list:
    """Training and decoding rows of the bench, the speed-up against the reference beside each."""
    keep = [r for r in rows if r["task"].startswith(("train_step", "sample")) and r.get("tokens_per_s")]
    return [f"| {r['task']} | {r['backend']} | {r['dtype']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
            f"{'' if not r.get('speedup_vs_reference') else format(r['speedup_vs_reference'], '.2f')} | "
            f"{r.get('note', '')} |" for r in keep]


def summary(record: dict) -> str:
    lines = [f"GPU check, {record['date']}: " + ", ".join(f"{k} {v}" for k, v in record["environment"].items()), "",
             "| step | result | seconds | detail |", "| --- | --- | --- | --- |"]
    for step in record["steps"]:
        lines.append(f"| {step['step']} | {'pass' if step['ok'] else 'FAIL'} | {step['seconds']:.0f} | "
                     f"{step.get('detail', '')} |")
    by_name = {step["step"]: step for step in record["steps"]}
    tests = by_name.get("tests", {})
    if tests.get("largest_errors"):
        lines += ["", "| backend | dtype | largest scaled error | op, tensor | tolerance |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {e['backend']} | {e['dtype']} | {e['error']:.2e} | {e['op']} {e['tensor']} | {e['tol']:.1e} |"
                  for e in tests["largest_errors"]]
    lines += [f"FAILED {failure}" for failure in tests.get("failures", [])]
    rows = key_bench_rows(by_name.get("bench", {}).get("rows", []))
    if rows:
        lines += ["", "| task | backend | dtype | batch | tokens/s | x reference | note |", "|" + " --- |" * 7]
        lines += rows
    return "\n".join(lines)


def run_all(out_dir: str) -> int:
    import torch
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
              f"nothing to check; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return NO_GPU
    os.makedirs(out_dir, exist_ok=True)
    for stale in ("op_errors.jsonl", *(f"{name}.json" for name in STEPS)):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.unlink(os.path.join(out_dir, stale))
    record = {"date": datetime.date.today().isoformat(), "environment": {}, "steps": []}
    for name in STEPS:
        print(f"== gpu_check: {name} (limit {TIME_LIMITS[name]} s)", flush=True)
        result = run_step(name, out_dir, TIME_LIMITS[name])
        record["environment"].update(result.pop("environment", {}))
        record["steps"].append(result)
        if name == "build" and not result["ok"]:
            break  # nothing else can run without the extension
    write_json(os.path.join(out_dir, "gpu_check.json"), record)
    print(summary(record))
    return 0 if all(step["ok"] for step in record["steps"]) and len(record["steps"]) == len(STEPS) else 1


def build_parser():
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and each step's files")
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one step, in the child process
    p.add_argument("--summary", metavar="FILE", help="print the summary table of a recorded gpu_check.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.summary:
        print(summary(read_json(args.summary)))
        return 0
    if args.step:
        try:
            result = STEP_FUNCTIONS[args.step](args.out)
        except Exception as e:  # the step's failure, reported in the summary by name
            traceback.print_exc()
            result = {"ok": False, "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        write_json(os.path.join(args.out, f"{args.step}.json"), result)
        return 0
    return run_all(args.out)


if __name__ == "__main__":
    sys.exit(main())
