"""The training loop: set-up, one optimizer step, evaluate-and-save, and the loop that runs them.

Writes out_dir/ckpt.pt (the latest, at every evaluation) and out_dir/best.pt (best val loss), both
atomically, plus out_dir/metrics.csv, out_dir/loss.png and out_dir/run.json (mingpt.train.records), and
prints one short sample per sentiment at every evaluation. A new run refuses an out_dir that holds
another (records.claim_out_dir). SIGINT/SIGTERM write a checkpoint and stop.
Under torchrun each process computes its share of the micro-batches (DistributedDataParallel).
"""
import contextlib
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..runtime import autocast_context, init_distributed, keep_freed_memory
from .evaluation import evaluate_and_save, update_average
from .schedule import learning_rate, schedule_level
from .state import Run, end_record, save, set_up, time_share


class Interrupted(Exception):
    """Training stopped by a signal after writing a checkpoint."""


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


class ProgressBar:
    """The loop's progress on a terminal: time spent of the max_minutes budget where there is one, else
    steps of max_iters, with the step, its loss and real tokens/s. Nothing where standard error is not a
    terminal (a log file gets the evaluation lines alone)."""

    def __init__(self, run: Run):
        from tqdm import tqdm
        self.run, self.budget_s = run, 60 * run.cfg.max_minutes if run.cfg.max_minutes else None
        if self.budget_s:
            self.bar = tqdm(total=round(self.budget_s), desc="train", unit="s", dynamic_ncols=True, mininterval=1.0,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total} s [{postfix}]")
        else:
            self.bar = tqdm(total=run.cfg.max_iters, initial=run.it, desc="train", unit="it", dynamic_ncols=True,
                            mininterval=1.0)

    @staticmethod
    def wanted(run: Run) -> bool:
        return run.cfg.progress and run.ddp.is_main and sys.stderr.isatty()

    def step(self, loss: float):
        run = self.run
        self.bar.set_postfix_str(f"step {run.it}, loss {loss:.3f}, {run.tokens_per_s:,.0f} tok/s, "
                                 f"real {run.real_token_share:.0%}", refresh=False)
        if self.budget_s:
            self.bar.update(min(round(time.perf_counter() - run.clock_start), self.bar.total) - self.bar.n)
        else:
            self.bar.update(1)

    def write(self, message: str):
        self.bar.write(message)

    def close(self):
        self.bar.close()


def train_loop(run: Run) -> float:
    """Steps until max_iters or max_minutes, evaluating every eval_interval steps; returns the seconds it took."""
    cfg, start_iter = run.cfg, run.it
    slots_per_step = cfg.batch_size * cfg.grad_accum * cfg.model.block_size
    progress = ProgressBar(run) if ProgressBar.wanted(run) else None
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
                progress.step(step_loss.item())
    if progress:
        progress.close()
    return time.perf_counter() - started


def train(cfg: TrainConfig, clock_start: Optional[float] = None) -> dict:
    """Run training as configured; returns a summary with the final losses. The max_minutes budget runs from
    clock_start (a perf_counter reading: when the command began, so that preparing data counts; default now)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
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
