"""Side-by-side speed of the reference path and the fast paths, in one run:
`python -m mingpt.bench [--json PATH]` (or `python benchmarks/bench.py`).

Rows: the machine's matmul peak (for MFU), the training step's matrix products alone at their own shapes
(the most MFU a step could reach), the training step per backend, dtype and row layout (tokens/s
counts real tokens: rows of real reviews' lengths, one padded review a row or several packed; the note
gives the real-token share),
sampling (tokens/s, 1 and 10 samples) per sampler and, for the compiled sampler, per weight format
beside that format's streaming bound (reading its weight bytes once per step), and every op of the
op table per backend (forward and forward+backward). Configurations alternate within each round and each figure is
the median over rounds, so drift on a shared machine hits every row alike. A row that cannot
run here says why instead of giving a number.
"""
import argparse
import dataclasses
import itertools
import json
import math
import resource
import statistics
import sys
import time

import numpy as np
import torch

from mingpt.config import preset_config
from mingpt.data.corpus import load_embedded_corpus, load_table
from mingpt.ops.extension import require_extension
from mingpt.model import GPT, OPTIMIZERS
from mingpt.ops import OP_NAMES, BackendUnavailable, get_ops
from mingpt.optim import newton_schulz_dtype
from mingpt.data.packing import ReviewPacker, load_packed
from mingpt.sample.compiled import packed_sampler
from mingpt.sample.engine import SAMPLERS, generate, resolve_sampler
from mingpt.sample.settings import WEIGHT_FORMATS, SamplingSettings
from mingpt.runtime import autocast_context, keep_freed_memory

TRAIN_BACKENDS = ("reference", "sdpa", "compile", "triton", "cpp", "compile-cpp")
COMPILED = {"compile": "reference", "compile-cpp": "cpp"}  # torch.compile of a model on that backend
OP_BACKENDS = ("reference", "sdpa", "triton", "cpp")


@dataclasses.dataclass
class Row:
    task: str
    backend: str
    dtype: str
    batch: int
    tokens_per_s: float = None
    ms: float = None
    mfu: float = None
    note: str = ""


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def backend_unavailable(backend: str, device) -> str:
    """Why `backend` cannot be measured here, or None."""
    if backend == "triton" and device.type != "cuda":
        return "no CUDA device; the Triton interpreter is a correctness check, not a speed path"
    backend = COMPILED.get(backend, backend)
    try:
        get_ops(backend, device)
    except BackendUnavailable as e:
        return str(e)
    return None


def matmul_gflops(dtype, device, n=2048, repeats=5) -> float:
    """The best of `repeats` n x n products; a GPU needs n = 8192 to reach its peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def step_matmul_shapes(model: GPT, batch_size: int) -> list:
    """(batch, m, k, n) of every matrix product in one training step of `model` on batch_size full rows:
    each linear layer's forward, input-gradient and weight-gradient products, and attention's two forward and
    four backward products per head (the work model.flops_per_token counts)."""
    c = model.config
    tokens, head_size = batch_size * c.block_size, c.n_embd // c.n_head
    shapes = []
    for linear in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        k, n = linear.in_features, linear.out_features
        shapes += [(1, tokens, k, n), (1, tokens, n, k), (1, k, tokens, n)]
    heads = batch_size * c.n_head
    per_layer = [(heads, c.block_size, head_size, c.block_size), (heads, c.block_size, c.block_size, head_size)]
    return shapes + per_layer * 3 * c.n_layer


def step_matmuls_seconds(shapes, dtype, device, repeats=5) -> float:
    """Seconds to run the products `shapes` one after another (best of `repeats`): a training step of that
    model if nothing but its matrix products took time."""
    operands = [(torch.randn(b, m, k, device=device, dtype=dtype), torch.randn(b, k, n, device=device, dtype=dtype))
                for b, m, k, n in shapes]

    def products():
        for a, b in operands:
            torch.bmm(a, b)

    products()
    return min(timed(products, device) for _ in range(repeats))


def bench_model(preset: str, vocab_size: int, device, backend="reference") -> GPT:
    cfg = preset_config(preset)
    cfg.model.vocab_size = vocab_size
    torch.manual_seed(0)
    return GPT(cfg.model, backend=backend).to(device)


ROW_LAYOUTS = ("padded", "packed")
PAD_ID = 0


def review_rows(reviews, block_size: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Review-layout rows with the token counts of `reviews` (text, <bos>, sentiment and <eos>; a longer
    review split into windows, as prepare does) holding random token ids, padded with PAD_ID."""
    row_len, lengths = block_size + 1, []
    for review in reviews:
        n = len(review.text) + 3
        lengths += [row_len] * ((n - 1) // block_size) + [min(row_len, 1 + (n - 1) % block_size)]
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, vocab_size, size=(len(lengths), row_len))
    rows[np.arange(row_len)[None, :] >= np.array(lengths)[:, None]] = PAD_ID
    return rows


def training_batch(rows: np.ndarray, layout: str, batch_size: int, seed: int = 0):
    """Inputs, targets and starts (None unpacked) of one batch of `rows`: batch_size of them, or packed."""
    generator = torch.Generator().manual_seed(seed)

    def draw(n):
        return torch.randint(len(rows), (n,), generator=generator)

    if layout == "packed":
        return load_packed(rows, ReviewPacker(rows, PAD_ID).plan(batch_size, draw), PAD_ID)
    chunk = torch.from_numpy(rows[draw(batch_size).numpy()])
    x, y = chunk[:, :-1].clone(), chunk[:, 1:].clone()
    y[y == PAD_ID] = -1
    return x, y, None


def make_train_step(preset: str, vocab_size: int, backend: str, dtype: str, batch, device, optimizer: str):
    """A closure running one training step of `preset` with `optimizer` (mingpt.model.OPTIMIZERS) on a batch
    (x, y, starts)."""
    model = bench_model(preset, vocab_size, device, COMPILED.get(backend, backend))
    forward = torch.compile(model) if backend in COMPILED else model
    optimizers = model.configure_optimizers(0.1, 1e-4, (0.9, 0.99), optimizer,
                                            muon_dtype=newton_schulz_dtype(dtype))
    x, y, starts = (None if t is None else t.to(device) for t in batch)

    def step():
        with autocast_context(dtype, device):
            _, loss = forward(x, y, starts=starts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, model


def make_sampler_run(model, sampler: str, num_samples: int, new_tokens: int, device, weights="fp32", guidance=1.0):
    """Guided, each sample also runs under a second prompt (another first token): twice the rows."""
    idx = torch.zeros((num_samples, 1), dtype=torch.long, device=device)
    settings = SamplingSettings.plain(weights=weights, guidance=guidance)
    return lambda: generate(model, idx, new_tokens, settings, seed=0, sampler=sampler, guidance_idx=idx + 1)


def make_stream_read(nbytes: int):
    """A closure reading a buffer of nbytes once with the sampler's threads and vector loads
    (mingpt._C.stream_read): the time a decode step needs at least to stream weights of that size."""
    buffer, threads = torch.rand(nbytes // 4), torch.get_num_threads()
    return lambda: require_extension().stream_read(buffer, threads)


# The dtype column of the compiled sampler's rows per weight format.
FORMAT_DTYPES = {"fp32": "float32", "bf16": "bf16", "int8": "int8"}


def op_inputs(op: str, preset: str, vocab_size: int, batch_size: int, device):
    """Arguments for one call of `op` at the shapes `preset` trains with."""
    c = preset_config(preset).model
    B, T, C = batch_size, c.block_size, c.n_embd

    def leaf(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)

    if op == "layer_norm":
        return (leaf(B, T, C), leaf(C), leaf(C))
    if op == "bias_gelu":
        return (leaf(B, T, 4 * C), leaf(4 * C))
    if op == "causal_attention":
        return (leaf(B, T, 3 * C), c.n_head)
    if op == "cross_entropy":
        return (leaf(B, T, vocab_size), torch.randint(vocab_size, (B, T), device=device))
    if op == "dropout":
        return (leaf(B, T, C), c.dropout, True)
    if op == "rotary":
        angles = torch.rand(1, T, C // c.n_head // 2, device=device) * 2 * math.pi
        return (leaf(B, T, 3 * C), angles.cos(), angles.sin(), c.n_head)
    raise ValueError(op)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def op_pass(fn, inputs, pass_: str, synchronize=lambda: None):
    """A zero-argument callable running one pass of fn(*inputs): "forward" without autograd, or
    "forward+backward" from upstream gradients drawn once (an op may return a tuple), clearing the
    inputs' gradients first so they never accumulate; `synchronize` ends each call."""
    if pass_ == "forward":
        def forward():
            with torch.no_grad():
                fn(*inputs)
            synchronize()
        return forward
    grads = [torch.randn_like(o) for o in _as_tuple(fn(*inputs))]

    def forward_backward():
        for t in inputs:
            if torch.is_tensor(t):
                t.grad = None
        torch.autograd.backward(_as_tuple(fn(*inputs)), grads)
        synchronize()
    return forward_backward


def run_rounds(configs: dict, rounds: int, calls: int, device) -> dict:
    """Median seconds per call of each closure, configurations alternating within every round."""
    samples = {name: [] for name in configs}
    for _ in range(rounds):
        for name, fn in configs.items():
            samples[name].append(timed(lambda: [fn() for _ in range(calls)], device) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def load_bench_reviews(source: str):
    """The reviews whose lengths shape the training rows: the embedded corpus, or a labelled file."""
    return load_embedded_corpus()[0] if source == "embedded" else load_table(source)[0]


def bench_training(args, device, peaks) -> list:
    """Training-step rows: tokens/s counts real tokens; MFU counts every token slot computed on."""
    rows, configs, real = [], {}, {}
    stored = review_rows(load_bench_reviews(args.reviews), preset_config(args.preset).model.block_size,
                         args.vocab_size)
    batches = {layout: training_batch(stored, layout, args.batch_size) for layout in ROW_LAYOUTS}
    optimizers = args.optimizers.split(",") if args.optimizers else [preset_config(args.preset).optimizer]
    for dtype, backend, layout, optimizer in itertools.product(args.dtypes, args.backends, ROW_LAYOUTS, optimizers):
        task = f"train_step:{layout}"
        reason = backend_unavailable(backend, device)
        if reason is None and dtype == "bfloat16" and backend in COMPILED:
            reason = "bf16 autocast under torch.compile is not measured"
        if reason:
            rows.append(Row(task, backend, dtype, args.batch_size, note=f"skipped: {reason}"))
            continue
        try:
            step, model = make_train_step(args.preset, args.vocab_size, backend, dtype, batches[layout], device,
                                          optimizer)
            for _ in range(args.warmup):
                step()
        except Exception as e:  # a fast path that fails to build here is reported, not fatal
            rows.append(Row(task, backend, dtype, args.batch_size,
                            note=f"skipped: failed here: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            continue
        configs[(task, backend, dtype, optimizer)] = step
        flops_per_token = model.flops_per_token()
    for layout, (x, _, _) in batches.items():
        real[f"train_step:{layout}"] = (int((x != PAD_ID).sum()), x.numel())
    for (task, backend, dtype, optimizer), seconds in run_rounds(configs, args.rounds, args.steps, device).items():
        real_tokens, slots = real[task]
        mfu = slots / seconds * flops_per_token / (peaks[dtype] * 1e9)
        rows.append(Row(task, backend, dtype, args.batch_size, real_tokens / seconds, seconds * 1e3, mfu,
                        note=f"real tokens {real_tokens / slots:.0%} of the slots; {optimizer}"))
    return rows


def sampling_configs(model, args, device):
    """The closures to time: every sampler at each of args.sample_batches, the compiled one in each weight
    format, every sampler guided (keyed (sampler, format, samples, guidance)), and rows that cannot run here.
    On CUDA the cached sampler decodes with the fused op table (the extension's decode kernels); the
    others keep the reference ops."""
    rows, configs = [], {}
    fused = bench_model(args.preset, args.vocab_size, device, "auto").eval() if device.type == "cuda" else model
    runs = [(sampler, "fp32", 1.0) for sampler in SAMPLERS if sampler not in ("auto", "cached")]
    runs += [("cached", weights, 1.0) for weights in WEIGHT_FORMATS]
    runs += [(sampler, "fp32", 2.0) for sampler in SAMPLERS if sampler != "auto"]
    for (sampler, weights, guidance), num_samples in itertools.product(runs, args.sample_batches):
        try:
            run = make_sampler_run(fused if sampler == "cached" else model, sampler, num_samples, args.new_tokens,
                                   device, weights, guidance)
            run()
        except (RuntimeError, ValueError) as e:
            rows.append(Row("sample", sampler, FORMAT_DTYPES[weights], num_samples, note=f"skipped: {e}"))
            continue
        configs[(sampler, weights, num_samples, guidance)] = run
    return rows, configs


def bench_sampling(args, device) -> list:
    model = bench_model(args.preset, args.vocab_size, device).eval()
    rows, configs = sampling_configs(model, args, device)
    streamed = {w: packed_sampler(model, w).streamed_bytes for (sampler, w, _, _) in configs
                if sampler == "cached" and device.type == "cpu"}  # the bound of the compiled CPU sampler
    reads = {w: make_stream_read(nbytes) for w, nbytes in streamed.items()}
    for (sampler, weights, num_samples, guidance), seconds in run_rounds(configs, args.rounds, 1, device).items():
        note = f"{args.new_tokens} new tokens" + (f", guidance {guidance:g}" if guidance != 1.0 else "")
        rows.append(Row("sample", sampler, FORMAT_DTYPES[weights], num_samples,
                        num_samples * args.new_tokens / seconds, seconds * 1e3, note=note))
    for weights, seconds in run_rounds(reads, args.rounds, 50, device).items():
        for num_samples in args.sample_batches:
            rows.append(Row("sample", "stream-bound", FORMAT_DTYPES[weights], num_samples,
                            num_samples / seconds, seconds * args.new_tokens * 1e3,
                            note=f"reading {streamed[weights] / 1e6:.1f} MB once per step"))
    return rows


def weight_format_summary(rows) -> list:
    """Lines comparing the compiled sampler's weight formats: speed against fp32 and against the
    format's streaming bound, at each batch."""
    speed = {(r.backend, r.dtype, r.batch): r.tokens_per_s for r in rows
             if r.task == "sample" and r.tokens_per_s and "guidance" not in r.note}
    lines = []
    for weights in WEIGHT_FORMATS:
        dtype = FORMAT_DTYPES[weights]
        for batch in sorted({r.batch for r in rows if r.task == "sample"}):
            tok_s, fp32 = speed.get(("cached", dtype, batch)), speed.get(("cached", "float32", batch))
            bound = speed.get(("stream-bound", dtype, batch))
            if tok_s and fp32 and bound:
                lines.append(f"cached {weights:<5} batch {batch:>2}: {tok_s:8,.0f} tokens/s, {tok_s / fp32:.2f}x fp32, "
                             f"{tok_s / bound:.0%} of its streaming bound ({bound:,.0f} tokens/s)")
    return lines


def bench_ops(args, device) -> list:
    rows, configs = [], {}
    tokens = args.batch_size * preset_config(args.preset).model.block_size
    for op in OP_NAMES:
        for backend in OP_BACKENDS:
            reason = backend_unavailable(backend, device)
            ops = None if reason else get_ops(backend, device)
            if ops is not None and ops.sources[op] != backend:
                reason = f"{backend} has no {op} of its own"
            if reason:
                rows.append(Row(f"op:{op}", backend, "float32", args.batch_size, note=f"skipped: {reason}"))
                continue
            inputs = op_inputs(op, args.preset, args.vocab_size, args.batch_size, device)
            for phase in ("forward", "forward+backward"):
                run = op_pass(getattr(ops, op), inputs, phase)
                run()
                configs[(op, backend, phase)] = run
    for (op, backend, phase), seconds in run_rounds(configs, args.rounds, 5, device).items():
        rows.append(Row(f"op:{op}", backend, "float32", args.batch_size, tokens / seconds, seconds * 1e3,
                        note=phase))
    return rows


def row_order(row: Row):
    task = row.task.split(":")[0]
    backends = TRAIN_BACKENDS + tuple(s for s in SAMPLERS if s not in TRAIN_BACKENDS) + ("stream-bound",)
    return (("matmul_2048", "matmul_8192", "matmul_step", "train_step", "sample", "op").index(task), row.task,
            row.dtype != "float32", row.dtype, row.batch, row.note, backends.index(row.backend) if row.backend in backends else -1)


def speedups(rows):
    """Each measured row's speed relative to the reference row of the same task and batch."""
    base = {(r.task, r.batch, r.note): r.tokens_per_s for r in rows
            if r.backend == "reference" and r.dtype == "float32" and r.tokens_per_s}
    return [base.get((r.task, r.batch, r.note)) and r.tokens_per_s and r.tokens_per_s / base[(r.task, r.batch, r.note)]
            for r in rows]


def markdown_table(rows) -> str:
    lines = ["| task | backend | dtype | batch | tokens/s | ms | x ref | MFU | note |", "|" + " --- |" * 9]
    for row, speedup in zip(rows, speedups(rows)):
        lines.append(f"| {row.task} | {row.backend} | {row.dtype} | {row.batch} | "
                     f"{'' if row.tokens_per_s is None else f'{row.tokens_per_s:,.0f}'} | "
                     f"{'' if row.ms is None else f'{row.ms:.2f}'} | {'' if not speedup else f'{speedup:.2f}'} | "
                     f"{'' if row.mfu is None else f'{100 * row.mfu:.0f}%'} | {row.note} |")
    return "\n".join(lines) + "\n"


def print_table(rows, file=sys.stdout):
    print(f"{'task':<26}{'backend':<13}{'dtype':<10}{'batch':>5}{'tokens/s':>12}{'ms':>10}{'x ref':>7}{'MFU':>7}  note",
          file=file)
    for row, speedup in zip(rows, speedups(rows)):
        print(f"{row.task:<26}{row.backend:<13}{row.dtype:<10}{row.batch:>5}"
              f"{'' if row.tokens_per_s is None else f'{row.tokens_per_s:,.0f}':>12}"
              f"{'' if row.ms is None else f'{row.ms:.2f}':>10}"
              f"{'' if not speedup else f'{speedup:.2f}':>7}"
              f"{'' if row.mfu is None else f'{100 * row.mfu:.0f}%':>7}  {row.note}", file=file)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mingpt.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed", help="model shape to time (random weights)")
    p.add_argument("--vocab_size", type=int, default=2212, help="vocabulary (2,212: the 5k movie reviews)")
    p.add_argument("--batch_size", type=int, default=32, help="training batch (rows of block_size)")
    p.add_argument("--reviews", default="embedded",
                   help="whose review lengths shape the training rows: embedded (the embedded corpus) or a CSV path")
    p.add_argument("--new_tokens", type=int, default=60, help="tokens each sample generates")
    p.add_argument("--sample_batches", default="1,10", help="comma-separated numbers of samples decoded at once")
    p.add_argument("--tasks", default="matmul,train,sample,ops", help="comma-separated subset of matmul,train,sample,ops")
    p.add_argument("--backends", default=",".join(TRAIN_BACKENDS), help="training-step backends")
    p.add_argument("--dtypes", default="float32,bfloat16", help="training-step dtypes")
    p.add_argument("--optimizers", help=f"comma-separated training-step optimizers, of {','.join(OPTIMIZERS)} "
                   "(default: the preset's)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; figures are medians over them")
    p.add_argument("--steps", type=int, default=3, help="training steps per configuration per round")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="also write the rows as a JSON list to this path")
    p.add_argument("--markdown", help="also write the table in markdown to this path")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = set((args.optimizers or "").split(",")) - set(OPTIMIZERS) - {""}
    if unknown:
        parser.error(f"--optimizers: unknown {', '.join(sorted(unknown))}; choose from {', '.join(OPTIMIZERS)}")
    args.backends, args.dtypes = args.backends.split(","), args.dtypes.split(",")
    args.sample_batches = [int(n) for n in args.sample_batches.split(",")]
    tasks = set(args.tasks.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as training does
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, preset {args.preset} "
          f"(vocab {args.vocab_size}), sampler auto -> {resolve_sampler('auto')}, freed memory kept for reuse: "
          f"{'yes' if kept else 'no'}", flush=True)
    rows = []
    n = 8192 if device.type == "cuda" else 2048
    peaks = {dtype: matmul_gflops(getattr(torch, dtype), device, n) for dtype in args.dtypes}
    if "matmul" in tasks:
        rows += [Row(f"matmul_{n}", "torch", dtype, 1, note=f"{gflops:.0f} GFLOP/s (MFU denominator)")
                 for dtype, gflops in peaks.items()]
        model = bench_model(args.preset, args.vocab_size, device)
        shapes = step_matmul_shapes(model, args.batch_size)
        tokens, flops = args.batch_size * model.config.block_size, sum(2 * b * m * k * n for b, m, k, n in shapes)
        for dtype in args.dtypes:
            seconds = step_matmuls_seconds(shapes, getattr(torch, dtype), device)
            gflops = flops / seconds / 1e9
            rows.append(Row("matmul_step", "torch", dtype, args.batch_size, tokens / seconds, seconds * 1e3,
                            gflops / peaks[dtype],
                            note=f"{gflops:.0f} GFLOP/s: the training step's {len(shapes)} matrix products alone "
                                 "at their own shapes (the step's MFU ceiling)"))
    if "train" in tasks:
        rows += bench_training(args, device, peaks)
    if "sample" in tasks:
        rows += bench_sampling(args, device)
    if "ops" in tasks:
        rows += bench_ops(args, device)
    rows.sort(key=row_order)
    print_table(rows)
    for line in weight_format_summary(rows):
        print(line)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this run: {peak_mb:,.0f} MB")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([dataclasses.asdict(r) | {"speedup_vs_reference": s} for r, s in zip(rows, speedups(rows))],
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
