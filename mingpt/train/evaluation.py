"""Evaluation during training: losses of both splits, nats per character of held-out reviews, a sample per
sentiment, metrics.csv and loss.png, the checkpoints (best.pt on improvement), and the averaged weights
(--ema_decay) that evaluation measures."""
import contextlib
import csv
import os
import time

import torch

from ..data.tokens import TokenData
from ..config import TrainConfig
from ..metrics import nats_per_char
from ..runtime import autocast_context
from ..sample.reviews import write_samples
from ..tokenizer import SENTIMENT_TOKENS
from .records import record_evaluation, write_record
from .schedule import learning_rate
from .state import Run, save, time_share


METRIC_FIELDS = ("iter", "train_loss", "val_loss", "val_nats_per_char", "unaveraged_val_nats_per_char", "lr",
                 "tokens_per_s", "real_token_share", "elapsed_s")


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
