"""The training loop: set-up, one optimizer step, evaluate-and-save, and the loop that runs them.

Writes out_dir/ckpt.pt (the latest, at every evaluation) and out_dir/best.pt (best val loss), both
atomically, plus out_dir/metrics.csv, out_dir/loss.png and out_dir/run.json (mingpt.runs), and prints
one short sample per sentiment at every evaluation. A new run refuses an out_dir that holds another
(mingpt.runs.claim_out_dir). SIGINT/SIGTERM write a checkpoint and stop.
Under torchrun each process computes its share of the micro-batches (DistributedDataParallel).
"""
import contextlib
import csv
import dataclasses
import glob
import math
import os
import random
import shutil
import signal
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import extension
from .checkpoint import (TMP_PREFIX, CheckpointError, atomic_torch_save, load_checkpoint, load_pretrained_weights,
                         make_checkpoint)
from .config import GPTConfig, TrainConfig, apply_overrides
from .corpus import EMBEDDED_CORPUS, load_embedded_corpus, load_table
from .data import TokenData, prepare, summary_line
from .model import GPT
from .runs import claim_out_dir, data_summary, new_record, record_end, record_evaluation, write_record
from .runtime import Distributed, autocast_context, init_distributed
from .sampling import cached_sampler_unavailable_reason, write_samples
from .scoring import nats_per_char
from .tokenizer import SENTIMENT_TOKENS

METRIC_FIELDS = ("iter", "train_loss", "val_loss", "val_nats_per_char", "unaveraged_val_nats_per_char", "lr",
                 "tokens_per_s", "real_token_share", "elapsed_s")
# Held-out reviews scored for nats per character at each evaluation (all of them up to this many).
NATS_PER_CHAR_REVIEWS = 1000


class Interrupted(Exception):
    """Training stopped by a signal after writing a checkpoint."""


def schedule_level(it: int, cfg: TrainConfig, time_share: float = 0.0) -> float:
    """How far from decayed the run is after warmup: 1 at the peak learning rate, 0 at min_lr. cosine decays
    over the steps; wsd (warmup-stable-decay) holds 1 until the last decay_fraction of the run, then falls
    linearly. wsd's run is max_iters steps or the max_minutes budget, whichever ends first: `time_share` is
    the share of the budget spent."""
    if cfg.schedule == "wsd":
        left = 1.0 - max(it / cfg.max_iters, time_share)
        return min(1.0, max(0.0, left) / cfg.decay_fraction)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it >= decay_iters:
        return 0.0
    ratio = max(0.0, (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    return 0.5 * (1.0 + math.cos(math.pi * ratio))


def learning_rate(it: int, cfg: TrainConfig, time_share: float = 0.0) -> float:
    """A linear warmup over warmup_iters, then the schedule's level between learning_rate and min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    return cfg.min_lr + schedule_level(it, cfg, time_share) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, data: TokenData, cfg: TrainConfig, device, dtype) -> dict:
    """Mean loss over the same eval_iters batches of each split at every evaluation."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(split, cfg.batch_size, cfg.model.block_size, generator)
            with autocast_context(dtype, device):
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": list(random.getstate()[1])}


def restore_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), states["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(states["python"]), None))


def check_out_dir(out_dir: str, needed_bytes: int):
    """Fail at start-up, not after an hour of training, if checkpoints cannot be written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write-test")
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write to out_dir {out_dir}: {e.strerror}") from None
    free = shutil.disk_usage(out_dir).free
    if free < needed_bytes:
        raise ValueError(f"out_dir {out_dir} has {free / 2**20:,.0f} MiB free; checkpoints need about "
                         f"{needed_bytes / 2**20:,.0f} MiB")
    for stale in glob.glob(os.path.join(out_dir, TMP_PREFIX + "*")):
        os.unlink(stale)  # left by a process killed while writing


def append_metrics(path: str, row: dict):
    new = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot_losses(metrics_path: str, png_path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_path, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([int(r["iter"]) for r in rows], [float(r["train_loss"]) for r in rows], label="train")
    ax.plot([int(r["iter"]) for r in rows], [float(r["val_loss"]) for r in rows], label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so a checkpoint is written."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def load_resume_checkpoint(path: str, cfg: TrainConfig, data: TokenData) -> dict:
    ckpt = load_checkpoint(path)
    if GPTConfig(**ckpt["model_config"]) != cfg.model:
        raise CheckpointError(f"{path} was trained with model config {ckpt['model_config']}, "
                              f"not {dataclasses.asdict(cfg.model)}")
    if ckpt["tokenizer"] != data.tokenizer.to_dict():
        raise CheckpointError(f"{path} was trained with another tokenizer than the one in {cfg.data_dir}")
    return ckpt


@dataclasses.dataclass
class Run:
    """What a training run holds from one step to the next."""
    cfg: TrainConfig
    ddp: Distributed
    device: torch.device
    data: TokenData
    model: GPT
    step_model: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizers: list  # AdamW, and Muon beside it with --optimizer muon
    batch_generator: torch.Generator
    log: Callable
    scaler: Optional[torch.amp.GradScaler] = None  # float16's loss scaler (disabled for other dtypes)
    writer: Optional[object] = None  # a TensorBoard SummaryWriter, when --tensorboard is on
    sampler: str = "reference"  # the sampler of the evaluation samples
    record: Optional[dict] = None  # what out_dir/run.json holds (main process only)
    ema: Optional[list] = None  # the averaged weights (ema_decay), one tensor per parameter
    val_reviews: list = dataclasses.field(default_factory=list)  # (sentiment, text) scored for nats per character
    it: int = 0
    best_val: float = float("inf")
    losses: dict = dataclasses.field(default_factory=dict)
    tokens_per_s: float = 0.0  # real (not padding) tokens
    real_token_share: float = 0.0  # of the token slots the model computed on
    clock_start: float = 0.0  # perf_counter when the max_minutes budget began
    eval_seconds: float = 0.0  # how long the last evaluation took: kept free at the end of the budget

    def path(self, name: str) -> str:
        return os.path.join(self.cfg.out_dir, name)


def build_model(cfg: TrainConfig, data: TokenData, device) -> GPT:
    """A fresh model (seeded), or the --init_from checkpoint's weights and architecture for fine-tuning."""
    pretrained = None
    if cfg.init_from and not cfg.resume:
        pretrained = load_checkpoint(cfg.init_from)
        architecture = {k: v for k, v in pretrained["model_config"].items() if k not in ("vocab_size", "dropout")}
        apply_overrides(cfg.model, architecture, cfg.init_from)
    data.check_block_size(cfg.model.block_size)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = GPT(cfg.model, backend=cfg.backend)
    if pretrained:
        load_pretrained_weights(model, pretrained, data.tokenizer, cfg.init_from)
    return model.to(device)


def load_data(cfg: TrainConfig, ddp: Distributed):
    """The run's TokenData, prepared from cfg.csv into out_dir/data first (claiming out_dir before writing
    there: the folder the claim moved an earlier run to is returned), and a note for the log when
    corpus_share has no embedded-corpus reviews to draw."""
    moved = None
    if cfg.csv:
        moved = claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite, ddp.is_main)
        cfg.data_dir = os.path.join(cfg.out_dir, "data")
        if not cfg.resume and ddp.is_main:
            print(summary_line(prepare_csv(cfg)))
        if ddp.world_size > 1:
            dist.barrier()
    data = TokenData(cfg.data_dir)
    note = ""
    if cfg.corpus_share and data.sources is None:
        note = (f"; corpus_share {cfg.corpus_share} unused: {cfg.data_dir} holds no embedded-corpus reviews "
                "beside its own (train --csv adds them)")
        cfg.corpus_share = 0.0
    data.set_extra_share(cfg.corpus_share)
    return data, moved, note


def prepare_csv(cfg: TrainConfig) -> dict:
    """Token files in cfg.data_dir from the labelled reviews of cfg.csv (as `prepare --csv` makes them, for the
    model's block size), with the embedded corpus added to the train split when corpus_share asks for it."""
    reviews, drops, read_as = load_table(cfg.csv)
    extra = load_embedded_corpus()[0] if cfg.corpus_share else ()
    return prepare(reviews, drops, cfg.data_dir, block_size=cfg.model.block_size, source=cfg.csv, read_as=read_as,
                   extra_train=extra, extra_source=EMBEDDED_CORPUS)


def make_grad_scaler(dtype: str, device) -> torch.amp.GradScaler:
    """float16's gradient scaler: the loss is scaled up so small gradients survive in half precision, and
    a step whose gradients overflow is skipped (the scale then halves). A disabled scaler, for every other
    dtype, passes the loss and the step through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=dtype == "float16")


def open_tensorboard(cfg: TrainConfig):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))


def set_up(cfg: TrainConfig, ddp: Distributed, device, clock_start: Optional[float] = None) -> Run:
    """Data, model, optimizer and output folder, restored from out_dir/ckpt.pt with --resume. The max_minutes
    budget runs from clock_start (a perf_counter reading; default: now)."""
    clock_start = time.perf_counter() if clock_start is None else clock_start
    cfg.check()
    autocast_context(cfg.dtype, device)  # rejects a dtype the device cannot train in, before any work
    if cfg.grad_accum % ddp.world_size:
        raise ValueError(f"grad_accum {cfg.grad_accum} must be a multiple of the {ddp.world_size} processes")
    data, moved, corpus_note = load_data(cfg, ddp)
    balance = data.set_balance(cfg.balance)
    if cfg.sentiment_dropout and not (0 < cfg.sentiment_dropout < 1 and data.layout.balances_classes):
        raise ValueError(f"sentiment_dropout must be in [0, 1) and needs the review layout, got "
                         f"{cfg.sentiment_dropout} with the {data.layout.name} layout")
    data.set_packing(cfg.pack)
    model = build_model(cfg, data, device)
    if not cfg.csv:
        moved = claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite, ddp.is_main)
    if ddp.is_main:
        # latest + best + their temporary copies, each weights and two AdamW moments
        check_out_dir(cfg.out_dir, needed_bytes=4 * 3 * 4 * model.num_params())
    run = Run(cfg, ddp, device, data, model, step_model=model,
              optimizers=model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                                    cfg.optimizer),
              batch_generator=torch.Generator().manual_seed(cfg.seed),
              log=print if ddp.is_main else (lambda *a, **k: None), scaler=make_grad_scaler(cfg.dtype, device),
              val_reviews=data.review_texts("val")[:NATS_PER_CHAR_REVIEWS], clock_start=clock_start)
    if cfg.ema_decay:
        run.ema = [p.detach().clone() for p in model.parameters()]
    if cfg.resume:
        restore(run)
    if ddp.world_size > 1:
        run.step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    ops = model.ops
    run.log(f"model: {model.num_params():,} parameters ({cfg.model.n_layer} layers, {cfg.model.n_head} heads, "
            f"n_embd {cfg.model.n_embd}, block {cfg.model.block_size}, vocab {cfg.model.vocab_size}); "
            f"device {device}, dtype {cfg.dtype}, {ddp.world_size} process(es), backend {cfg.backend} -> "
            f"{ops.name} ({', '.join(f'{k}: {v}' for k, v in ops.sources.items())}); {balance}"
            + (f"; fine-tuning from {cfg.init_from}" if cfg.init_from and not cfg.resume else "")
            + f"; optimizer {cfg.optimizer}, schedule {cfg.schedule}" + ("; packed rows" if cfg.pack else "")
            + (f"; {cfg.corpus_share:.0%} of training reviews from the embedded corpus" if cfg.corpus_share else "")
            + corpus_note)
    if moved:
        run.log(f"--overwrite: moved the earlier run in {cfg.out_dir} to {moved}")
    if cfg.backend == "auto" and ops.name == "reference" and extension.UNAVAILABLE_REASON:
        run.log(f"backend auto runs the reference ops: {extension.UNAVAILABLE_REASON}")
    run.sampler = "cached" if cached_sampler_unavailable_reason(model) is None else "reference"
    if ddp.is_main:
        start_record(run, ops, balance)
    if cfg.tensorboard and ddp.is_main:
        run.writer = open_tensorboard(cfg)
    return run


def start_record(run: Run, ops, balance: str):
    """out_dir/run.json as the run starts (or resumes): how it was made."""
    cfg = run.cfg
    setup = {"device": str(run.device), "dtype": cfg.dtype, "processes": run.ddp.world_size,
             "parameters": run.model.num_params(), "sampler": run.sampler,
             "backend": {"requested": cfg.backend, "resolved": ops.name, "ops": dict(ops.sources)}}
    run.record = new_record(dataclasses.asdict(cfg), data_summary(cfg.data_dir, run.data.meta, balance), setup,
                            run.it if cfg.resume else None, cfg.out_dir)
    run.record["best_val_loss"] = None if run.best_val == float("inf") else run.best_val
    write_record(cfg.out_dir, run.record)


def end_record(run: Run, status: str):
    """The run's last word in run.json; a failure to write it never hides the error that ended the run."""
    if run.record is not None:
        record_end(run.record, status)
        with contextlib.suppress(OSError):
            write_record(run.cfg.out_dir, run.record)


def restore(run: Run):
    resumed = load_resume_checkpoint(run.path("ckpt.pt"), run.cfg, run.data)
    run.model.load_state_dict(resumed["model"])
    saved = resumed["optimizer"] if isinstance(resumed["optimizer"], list) else [resumed["optimizer"]]
    if len(saved) != len(run.optimizers):
        raise CheckpointError(f"{run.path('ckpt.pt')} holds the state of {len(saved)} optimizer(s), "
                              f"--optimizer {run.cfg.optimizer} needs {len(run.optimizers)}")
    for optimizer, state in zip(run.optimizers, saved):
        optimizer.load_state_dict(state)
    run.it, run.best_val = resumed["iter_num"], resumed["best_val_loss"]
    run.batch_generator.set_state(resumed["batch_rng"])
    if run.data.packer is not None:
        run.data.packer.waiting = list(resumed.get("packer_waiting", []))
    if run.ema is not None:
        if resumed.get("ema") is None:
            raise CheckpointError(f"{run.path('ckpt.pt')} holds no averaged weights to continue --ema_decay with")
        run.ema = [t.to(run.device) for t in resumed["ema"]]
    restore_rng_states(resumed["rng"])
    if resumed.get("grad_scaler"):
        run.scaler.load_state_dict(resumed["grad_scaler"])


def save(run: Run, name: str):
    if run.ddp.is_main:
        atomic_torch_save(make_checkpoint(
            run.model, run.data.tokenizer, run.data.meta, optimizer=[o.state_dict() for o in run.optimizers],
            iter_num=run.it, best_val_loss=run.best_val, train_config=dataclasses.asdict(run.cfg),
            batch_rng=run.batch_generator.get_state(), rng=rng_states(), grad_scaler=run.scaler.state_dict(),
            packer_waiting=list(run.data.packer.waiting) if run.data.packer is not None else [], ema=run.ema),
            run.path(name))


@torch.no_grad()
def update_average(run: Run):
    """Move the averaged weights toward the model's; the decay ramps up over the first steps, so that the
    average soon forgets the initialisation."""
    decay = min(run.cfg.ema_decay, (1 + run.it) / (10 + run.it))
    for average, param in zip(run.ema, run.model.parameters()):
        average.lerp_(param.detach(), 1.0 - decay)


@contextlib.contextmanager
def averaged_weights(run: Run):
    """The model holds the averaged weights inside the block (when ema_decay is on), its own after."""
    if run.ema is None:
        yield
        return
    params = list(run.model.parameters())
    own = [p.detach().clone() for p in params]
    with torch.no_grad():
        for param, average in zip(params, run.ema):
            param.copy_(average)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, weights in zip(params, own):
                param.copy_(weights)


def val_nats_per_char(run: Run) -> float:
    run.model.eval()
    with torch.no_grad(), autocast_context(run.cfg.dtype, run.device):
        nats = nats_per_char(run.model, run.data.tokenizer, run.data.layout, run.val_reviews)
    run.model.train()
    return nats


def time_share(run: Run) -> float:
    """The share of the max_minutes budget spent, less the time the final evaluation will take (0 without one)."""
    if run.cfg.max_minutes is None:
        return 0.0
    return (time.perf_counter() - run.clock_start) / max(1e-9, 60 * run.cfg.max_minutes - run.eval_seconds)


def micro_batches(run: Run) -> list:
    """The micro-batches of one step, each (x, y, starts or None), drawn for every process alike (the RNG
    streams stay in step) and loaded for this process's share."""
    cfg, data = run.cfg, run.data
    if cfg.pack:
        plans = [data.plan_packed_batch(cfg.batch_size, run.batch_generator) for _ in range(cfg.grad_accum)]
    else:
        plans = [data.sample_positions("train", cfg.batch_size, cfg.model.block_size, run.batch_generator)
                 for _ in range(cfg.grad_accum)]
    batches = []
    for micro in range(run.ddp.rank, cfg.grad_accum, run.ddp.world_size):
        if cfg.pack:
            x, y, starts = data.load_packed_batch(plans[micro])
        else:
            (x, y), starts = data.load_batch("train", plans[micro], cfg.model.block_size), None
        if cfg.sentiment_dropout:
            x, y = data.layout.drop_sentiment(x, y, cfg.sentiment_dropout, run.batch_generator, data.tokenizer)
        batches.append((x, y, starts))
    return batches


def optimizer_step(run: Run):
    """One optimizer step over batch_size x grad_accum sequences; returns the step's mean loss and the number
    of real (not padding) tokens it computed on, over all processes."""
    cfg, ddp = run.cfg, run.ddp
    lr = learning_rate(run.it, cfg, time_share(run))
    if cfg.corpus_share and cfg.corpus_fade:  # the mix moves to the user's own reviews as the rate decays
        run.data.set_extra_share(cfg.corpus_share * schedule_level(run.it, cfg, time_share(run)))
    for optimizer in run.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
    batches = micro_batches(run)
    totals = torch.zeros(2, device=run.device)  # the mean loss, the real tokens
    for n, (x, y, starts) in enumerate(batches):
        sync = n == len(batches) - 1 or ddp.world_size == 1
        with (contextlib.nullcontext() if sync else run.step_model.no_sync()):
            with autocast_context(cfg.dtype, run.device):
                _, loss = run.step_model(x.to(run.device), y.to(run.device),
                                         starts=None if starts is None else starts.to(run.device))
            run.scaler.scale(loss / len(batches)).backward()
        totals[0] += loss.detach() / len(batches)
        totals[1] += int((x != run.data.pad_id).sum())
    if ddp.world_size > 1:
        dist.all_reduce(totals)
        totals[0] /= ddp.world_size
    step_loss = totals[0]
    if not torch.isfinite(step_loss):
        raise FloatingPointError(f"loss became {step_loss.item()} at iteration {run.it}; the last "
                                 f"good checkpoint {run.path('ckpt.pt')} is left as it was")
    for optimizer in run.optimizers:
        run.scaler.unscale_(optimizer)  # clipping sees the true gradients
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    for optimizer in run.optimizers:
        run.scaler.step(optimizer)  # skipped when a gradient is inf or nan (float16 only)
    run.scaler.update()
    for optimizer in run.optimizers:
        optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        update_average(run)
    run.it += 1
    return step_loss, int(totals[1])


def eval_samples(run: Run) -> list:
    """[(sentiment, text)]: one short review per sentiment from the model as it is now (main process).

    They are drawn with generators of their own seeded by the run's seed (one seed per sentiment), so the
    training RNG streams are untouched and a resumed run prints what the straight run printed at the same
    iteration."""
    cfg = run.cfg
    if not cfg.eval_sample_tokens or not run.ddp.is_main or run.model.config.block_size < 2:
        return []
    return [write_samples(run.model, run.data.tokenizer, run.data.layout, "", sentiment, 1, cfg.eval_sample_tokens,
                          seed=cfg.seed + n, sampler=run.sampler)[0] for n, sentiment in enumerate(SENTIMENT_TOKENS)]


def evaluate_and_save(run: Run, elapsed_s: float) -> str:
    """Losses of both splits, a metrics row and plot, samples, ckpt.pt (and best.pt when val improved) and
    run.json; returns the log lines. With ema_decay the averaged weights are measured and go into best.pt;
    ckpt.pt holds the model's own weights and the average, to resume from."""
    started = time.perf_counter()
    with averaged_weights(run):
        run.losses = estimate_loss(run.model, run.data, run.cfg, run.device, run.cfg.dtype)
        run.losses["val_nats_per_char"] = val_nats_per_char(run)
        improved = run.losses["val"] < run.best_val
        run.best_val = min(run.best_val, run.losses["val"])
        samples = eval_samples(run)
        if improved:
            save(run, "best.pt")
    if run.ema is not None:
        run.losses["unaveraged_val_nats_per_char"] = val_nats_per_char(run)
    if run.ddp.is_main:
        unaveraged = run.losses.get("unaveraged_val_nats_per_char")
        append_metrics(run.path("metrics.csv"), dict(
            iter=run.it, train_loss=f"{run.losses['train']:.4f}", val_loss=f"{run.losses['val']:.4f}",
            val_nats_per_char=f"{run.losses['val_nats_per_char']:.4f}",
            unaveraged_val_nats_per_char="" if unaveraged is None else f"{unaveraged:.4f}",
            lr=f"{learning_rate(run.it, run.cfg, time_share(run)):.3e}", tokens_per_s=f"{run.tokens_per_s:.0f}",
            real_token_share=f"{run.real_token_share:.3f}", elapsed_s=f"{elapsed_s:.1f}"))
        plot_losses(run.path("metrics.csv"), run.path("loss.png"))
        if run.writer:
            run.writer.add_scalars("loss", {k: run.losses[k] for k in ("train", "val")}, run.it)
            for sentiment, text in samples:
                run.writer.add_text(f"samples/{sentiment}", text, run.it)
    save(run, "ckpt.pt")
    if run.record is not None:
        record_evaluation(run.record, run.it, run.losses, run.best_val, samples)
        write_record(run.cfg.out_dir, run.record)
    run.eval_seconds = time.perf_counter() - started
    unaveraged = run.losses.get("unaveraged_val_nats_per_char")
    return "\n".join([f"iter {run.it}: train loss {run.losses['train']:.4f}, val loss {run.losses['val']:.4f}, "
                      f"val {run.losses['val_nats_per_char']:.4f} nats/char"
                      + (f" (averaged; the model's own {unaveraged:.4f})" if unaveraged is not None else "")]
                     + [f"  [{sentiment}] {' '.join(text.split())}" for sentiment, text in samples])


def progress_bar(run: Run):
    if not (run.cfg.progress and run.ddp.is_main):
        return None
    from tqdm import tqdm
    return tqdm(total=run.cfg.max_iters, initial=run.it, desc="train", unit="it", dynamic_ncols=True,
                mininterval=1.0)


def train_loop(run: Run) -> float:
    """Steps until max_iters or max_minutes, evaluating every eval_interval steps; returns the seconds it took."""
    cfg, start_iter = run.cfg, run.it
    slots_per_step = cfg.batch_size * cfg.grad_accum * cfg.model.block_size
    progress = progress_bar(run)
    started = time.perf_counter()
    window_start, window_tokens, window_slots = started, 0, 0
    next_eval_s = 60 * cfg.eval_minutes if cfg.eval_minutes else None
    run.model.train()
    with StopSignals() as signals:
        while True:
            last = run.it >= cfg.max_iters or time_share(run) >= 1.0
            if next_eval_s is not None:
                due = time.perf_counter() - run.clock_start >= next_eval_s
                next_eval_s += 60 * cfg.eval_minutes if due else 0
            else:
                due = run.it % cfg.eval_interval == 0 and run.it > start_iter
            if due or last:
                message = evaluate_and_save(run, time.perf_counter() - run.clock_start)
                (progress.write if progress else run.log)(message)
            if last:
                break
            if signals.received:
                save(run, "ckpt.pt")
                raise Interrupted(f"{signals.received} at iteration {run.it}: wrote {run.path('ckpt.pt')}; "
                                  f"continue with --resume")
            step_loss, real_tokens = optimizer_step(run)
            window_tokens += real_tokens
            window_slots += slots_per_step
            if run.it % cfg.log_interval == 0 or run.it == cfg.max_iters:
                now = time.perf_counter()
                run.tokens_per_s = window_tokens / (now - window_start)
                run.real_token_share = window_tokens / window_slots
                window_start, window_tokens, window_slots = now, 0, 0
                if run.writer:
                    run.writer.add_scalar("train/loss_step", step_loss.item(), run.it)
                    run.writer.add_scalar("train/lr", learning_rate(run.it - 1, cfg, time_share(run)), run.it)
            if progress:
                progress.set_postfix(loss=f"{step_loss.item():.3f}", tok_s=f"{run.tokens_per_s:,.0f}",
                                     real=f"{run.real_token_share:.0%}", refresh=False)
                progress.update(1)
    if progress:
        progress.close()
    return time.perf_counter() - started


def train(cfg: TrainConfig, clock_start: Optional[float] = None) -> dict:
    """Run training as configured; returns a summary with the final losses. The max_minutes budget runs from
    clock_start (a perf_counter reading: when the command began, so that preparing data counts; default now)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ddp, device = init_distributed(cfg.device)
    try:
        run = set_up(cfg, ddp, device, clock_start)
        try:
            elapsed_s = train_loop(run)
        except BaseException as e:
            end_record(run, f"stopped: {e}" if isinstance(e, Interrupted) else f"failed: {type(e).__name__}: {e}")
            raise
        end_record(run, "finished")
        if run.writer:
            run.writer.close()
        return {"iters": run.it, "train_loss": run.losses["train"], "val_loss": run.losses["val"],
                "val_nats_per_char": run.losses["val_nats_per_char"], "tokens_per_s": run.tokens_per_s,
                "real_token_share": run.real_token_share,
                "best_val_loss": run.best_val, "elapsed_s": elapsed_s, "params": run.model.num_params(),
                "ckpt": run.path("ckpt.pt")}
    finally:
        if ddp.world_size > 1:
            dist.destroy_process_group()
