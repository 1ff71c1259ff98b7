"""Train a GPT on prepared token files: `python -m mingpt.train --preset demo --data_dir DIR --out_dir DIR`.

Writes out_dir/ckpt.pt (atomically, at every evaluation), out_dir/metrics.csv and out_dir/loss.png.
"""
import argparse
import contextlib
import csv
import dataclasses
import math
import os
import sys
import time

import torch

from .checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, make_checkpoint
from .config import (GPTConfig, TrainConfig, add_dataclass_arguments, apply_overrides, collect_overrides,
                     load_config_file, preset_config, PRESETS)
from .data import DataError, TokenData
from .model import GPT
from .ops import BACKENDS, BackendUnavailable, get_ops

HELP = {
    "data_dir": "prepared data (python -m mingpt.prepare)", "out_dir": "checkpoint, metrics and plot",
    "preset": f"model and schedule preset: {', '.join(PRESETS)}", "backend": f"ops backend: {', '.join(BACKENDS)}",
    "device": "auto, cpu, cuda or cuda:N", "dtype": "float32, bfloat16 (autocast) or float16 (CUDA autocast)",
    "seed": "seed of initialisation, batches and dropout", "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step", "max_iters": "optimizer steps in all",
    "learning_rate": "peak learning rate", "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "linear warmup steps", "lr_decay_iters": "steps of the cosine decay (None: max_iters)",
    "weight_decay": "AdamW weight decay on matrices", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0: off)", "eval_interval": "steps between evaluations and checkpoints",
    "eval_iters": "batches per split in an evaluation", "log_interval": "steps between progress updates",
    "max_minutes": "stop (with a final evaluation and checkpoint) after this many minutes",
    "resume": "continue from out_dir/ckpt.pt", "tensorboard": "also log to out_dir/tensorboard",
    "progress": "show a progress bar", "threads": "torch CPU threads (None: torch's default)",
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_embd": "embedding width",
    "block_size": "context length", "dropout": "dropout rate", "bias": "biases in linear layers and norms",
}
METRIC_FIELDS = ("iter", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mingpt.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Precedence: preset < --config file < command-line flags.")
    p.add_argument("--config", help="JSON file of options (keys as the flags; model options under \"model\")")
    add_dataclass_arguments(p, TrainConfig, HELP)
    add_dataclass_arguments(p, GPTConfig, HELP)
    return p


def config_from_args(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    cfg = preset_config(args.preset or TrainConfig.preset)
    if args.config:
        apply_overrides(cfg, load_config_file(args.config), args.config)
    apply_overrides(cfg, collect_overrides(args, TrainConfig), "command line")
    apply_overrides(cfg.model, collect_overrides(args, GPTConfig), "command line")
    return cfg


def learning_rate(it: int, cfg: TrainConfig) -> float:
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


def autocast_context(dtype: str, device: torch.device):
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype == "float16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    raise ValueError(f"dtype {dtype!r} is not supported on {device.type}; use float32 or bfloat16")


@torch.no_grad()
def estimate_loss(model, data: TokenData, cfg: TrainConfig, device, autocast) -> dict:
    """Mean loss over the same eval_iters batches of each split at every evaluation."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(split, cfg.batch_size, cfg.model.block_size, generator)
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def check_out_dir(out_dir: str):
    """Fail at start-up, not after an hour of training, if the output folder is not writable."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write-test")
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write to out_dir {out_dir}: {e.strerror}") from None


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


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns a summary with the final losses."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    autocast = autocast_context(cfg.dtype, device)
    data = TokenData(cfg.data_dir)
    data.check_block_size(cfg.model.block_size)
    check_out_dir(cfg.out_dir)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    metrics_path = os.path.join(cfg.out_dir, "metrics.csv")

    cfg.model.vocab_size = data.tokenizer.vocab_size
    resumed = None
    if cfg.resume:
        resumed = load_checkpoint(ckpt_path)
        if resumed["model_config"] != dataclasses.asdict(cfg.model):
            raise CheckpointError(f"{ckpt_path} was trained with model config {resumed['model_config']}, "
                                  f"not {dataclasses.asdict(cfg.model)}")
        if resumed["tokenizer"] != data.tokenizer.to_dict():
            raise CheckpointError(f"{ckpt_path} was trained with another tokenizer than {cfg.data_dir}")
    elif os.path.exists(metrics_path):
        os.unlink(metrics_path)

    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model, backend=cfg.backend).to(device)
    ops = get_ops(cfg.backend, device)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    batch_generator = torch.Generator().manual_seed(cfg.seed)
    start_iter, best_val = 0, float("inf")
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        start_iter, best_val = resumed["iter_num"], resumed["best_val_loss"]
        batch_generator.set_state(resumed["batch_rng"])
        torch.set_rng_state(resumed["torch_rng"])

    print(f"model: {model.num_params():,} parameters ({cfg.model.n_layer} layers, {cfg.model.n_head} heads, "
          f"n_embd {cfg.model.n_embd}, block {cfg.model.block_size}, vocab {cfg.model.vocab_size}); "
          f"device {device}, dtype {cfg.dtype}, backend {cfg.backend} -> {ops.name} "
          f"({', '.join(f'{k}: {v}' for k, v in ops.sources.items())})")
    writer = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))

    def save(iter_num):
        atomic_torch_save(make_checkpoint(
            model, data.tokenizer, data.meta, optimizer=optimizer.state_dict(), iter_num=iter_num,
            best_val_loss=best_val, train_config=dataclasses.asdict(cfg), batch_rng=batch_generator.get_state(),
            torch_rng=torch.get_rng_state()), ckpt_path)

    progress = None
    if cfg.progress:
        from tqdm import tqdm
        progress = tqdm(total=cfg.max_iters, initial=start_iter, desc="train", unit="it", dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.model.block_size
    started = time.perf_counter()
    window_start, window_tokens, tokens_per_s = started, 0, 0.0
    losses, it = {}, start_iter
    model.train()
    while True:
        out_of_time = cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes
        last = it >= cfg.max_iters or out_of_time
        if (it % cfg.eval_interval == 0 and it > start_iter) or last:
            losses = estimate_loss(model, data, cfg, device, autocast)
            best_val = min(best_val, losses["val"])
            append_metrics(metrics_path, dict(iter=it, train_loss=f"{losses['train']:.4f}",
                                              val_loss=f"{losses['val']:.4f}", lr=f"{learning_rate(it, cfg):.3e}",
                                              tokens_per_s=f"{tokens_per_s:.0f}",
                                              elapsed_s=f"{time.perf_counter() - started:.1f}"))
            if writer:
                writer.add_scalars("loss", losses, it)
            save(it)
            plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
            message = f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            (progress.write if progress else print)(message)
        if last:
            break
        lr = learning_rate(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum):
            x, y = data.get_batch("train", cfg.batch_size, cfg.model.block_size, batch_generator)
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            (loss / cfg.grad_accum).backward()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at iteration {it}; the checkpoint "
                                     f"{ckpt_path} from the last evaluation is intact")
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        window_tokens += tokens_per_step
        now = time.perf_counter()
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            tokens_per_s = window_tokens / (now - window_start)
            window_start, window_tokens = now, 0
            if writer:
                writer.add_scalar("train/loss_step", loss.item(), it)
                writer.add_scalar("train/lr", lr, it)
        if progress:
            progress.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            progress.update(1)
    if progress:
        progress.close()
    if writer:
        writer.close()
    return {"iters": it, "train_loss": losses["train"], "val_loss": losses["val"],
            "best_val_loss": best_val, "elapsed_s": time.perf_counter() - started,
            "params": model.num_params(), "ckpt": ckpt_path}


def main(argv=None):
    try:
        cfg = config_from_args(argv)
        result = train(cfg)
    except (DataError, CheckpointError, BackendUnavailable, ValueError, FloatingPointError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    print(f"done: {result['iters']} iterations in {result['elapsed_s']:.0f} s; final train loss "
          f"{result['train_loss']:.4f}, val loss {result['val_loss']:.4f}; checkpoint {result['ckpt']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
