"""Train a GPT on prepared token files: `python -m mingpt.train --preset demo --data_dir DIR --out_dir DIR`.

Writes out_dir/ckpt.pt (the latest, at every evaluation) and out_dir/best.pt (best val loss), both
atomically, plus out_dir/metrics.csv and out_dir/loss.png. SIGINT/SIGTERM write a checkpoint and exit.
Multi-process: `torchrun --nproc_per_node=N -m mingpt.train ...` (DistributedDataParallel, gloo on
CPU, NCCL on CUDA); the global batch is batch_size x grad_accum, split across the ranks.
"""
import argparse
import contextlib
import csv
import dataclasses
import glob
import math
import os
import random
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import (CheckpointError, atomic_torch_save, load_checkpoint, load_pretrained_weights,
                         make_checkpoint)
from .config import (PRESETS, GPTConfig, TrainConfig, add_dataclass_arguments, apply_overrides, collect_overrides,
                     load_config_file, preset_config)
from .data import DataError, TokenData
from .model import GPT
from .ops import BACKENDS, BackendUnavailable, get_ops

HELP = {
    "data_dir": "prepared data (python -m mingpt.prepare)", "out_dir": "checkpoints, metrics and plot",
    "preset": f"model and schedule preset: {', '.join(PRESETS)}", "backend": f"ops backend: {', '.join(BACKENDS)}",
    "device": "auto, cpu, cuda or cuda:N", "dtype": "float32, bfloat16 (autocast) or float16 (CUDA autocast)",
    "seed": "seed of initialisation, batches and dropout", "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step, over all processes", "max_iters": "optimizer steps in all",
    "learning_rate": "peak learning rate", "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "linear warmup steps", "lr_decay_iters": "steps of the cosine decay (None: max_iters)",
    "weight_decay": "AdamW weight decay on matrices", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0: off)", "eval_interval": "steps between evaluations and checkpoints",
    "eval_iters": "batches per split in an evaluation", "log_interval": "steps between tokens/s updates",
    "max_minutes": "stop (with a final evaluation and checkpoint) after this many minutes",
    "resume": "continue exactly from out_dir/ckpt.pt",
    "init_from": "fine-tune: start from this checkpoint's weights and architecture (a fresh optimizer and schedule)",
    "balance": "review layout: oversample the minority sentiment (auto: when it is under 35%%), on or off",
    "tensorboard": "also log to out_dir/tensorboard",
    "progress": "show a progress bar", "threads": "torch CPU threads per process (None: torch's default)",
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_embd": "embedding width",
    "block_size": "context length", "dropout": "dropout rate", "bias": "biases in linear layers and norms",
    "layer_norm_eps": "epsilon added to the variance in every layer norm",
}
METRIC_FIELDS = ("iter", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s")


class Interrupted(Exception):
    """Training stopped by a signal after writing a checkpoint."""


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


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str):
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Distributed(), resolve_device(device_name)
    dist_info = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist_info, device


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
    for stale in glob.glob(os.path.join(out_dir, ".tmp-*.pt")):
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
    if ckpt["model_config"] != dataclasses.asdict(cfg.model):
        raise CheckpointError(f"{path} was trained with model config {ckpt['model_config']}, "
                              f"not {dataclasses.asdict(cfg.model)}")
    if ckpt["tokenizer"] != data.tokenizer.to_dict():
        raise CheckpointError(f"{path} was trained with another tokenizer than the one in {cfg.data_dir}")
    return ckpt


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns a summary with the final losses."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ddp, device = init_distributed(cfg.device)
    try:
        return _train(cfg, ddp, device)
    finally:
        if ddp.world_size > 1:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ddp: Distributed, device) -> dict:
    autocast_context(cfg.dtype, device)  # rejects a dtype the device cannot train in, before any work
    if cfg.grad_accum % ddp.world_size:
        raise ValueError(f"grad_accum {cfg.grad_accum} must be a multiple of the {ddp.world_size} processes")
    data = TokenData(cfg.data_dir)
    balance = data.set_balance(cfg.balance)
    pretrained = None
    if cfg.init_from and not cfg.resume:
        pretrained = load_checkpoint(cfg.init_from)
        architecture = {k: v for k, v in pretrained["model_config"].items() if k not in ("vocab_size", "dropout")}
        apply_overrides(cfg.model, architecture, cfg.init_from)
    data.check_block_size(cfg.model.block_size)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    latest_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    metrics_path = os.path.join(cfg.out_dir, "metrics.csv")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = GPT(cfg.model, backend=cfg.backend)
    if pretrained:
        load_pretrained_weights(model, pretrained, data.tokenizer, cfg.init_from)
    model.to(device)
    ops = get_ops(cfg.backend, device)
    if ddp.is_main:
        # latest + best + their temporary copies, each weights and two AdamW moments
        check_out_dir(cfg.out_dir, needed_bytes=4 * 3 * 4 * model.num_params())
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    batch_generator = torch.Generator().manual_seed(cfg.seed)
    start_iter, best_val = 0, float("inf")
    if cfg.resume:
        resumed = load_resume_checkpoint(latest_path, cfg, data)
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        start_iter, best_val = resumed["iter_num"], resumed["best_val_loss"]
        batch_generator.set_state(resumed["batch_rng"])
        restore_rng_states(resumed["rng"])
    elif ddp.is_main and os.path.exists(metrics_path):
        os.unlink(metrics_path)
    step_model = model
    if ddp.world_size > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    log = print if ddp.is_main else (lambda *a, **k: None)
    log(f"model: {model.num_params():,} parameters ({cfg.model.n_layer} layers, {cfg.model.n_head} heads, "
        f"n_embd {cfg.model.n_embd}, block {cfg.model.block_size}, vocab {cfg.model.vocab_size}); "
        f"device {device}, dtype {cfg.dtype}, {ddp.world_size} process(es), backend {cfg.backend} -> {ops.name} "
        f"({', '.join(f'{k}: {v}' for k, v in ops.sources.items())}); {balance}"
        + (f"; fine-tuning from {cfg.init_from}" if pretrained else ""))
    writer = None
    if cfg.tensorboard and ddp.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))

    def save(path, iter_num):
        if ddp.is_main:
            atomic_torch_save(make_checkpoint(
                model, data.tokenizer, data.meta, optimizer=optimizer.state_dict(), iter_num=iter_num,
                best_val_loss=best_val, train_config=dataclasses.asdict(cfg),
                batch_rng=batch_generator.get_state(), rng=rng_states()), path)

    progress = None
    if cfg.progress and ddp.is_main:
        from tqdm import tqdm
        progress = tqdm(total=cfg.max_iters, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
                        mininterval=1.0)
    micro_steps = range(ddp.rank, cfg.grad_accum, ddp.world_size)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.model.block_size
    started = time.perf_counter()
    window_start, window_tokens, tokens_per_s = started, 0, 0.0
    losses, it = {}, start_iter
    model.train()
    with StopSignals() as signals:
        while True:
            out_of_time = cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes
            last = it >= cfg.max_iters or out_of_time
            if (it % cfg.eval_interval == 0 and it > start_iter) or last:
                losses = estimate_loss(model, data, cfg, device, cfg.dtype)
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                if ddp.is_main:
                    append_metrics(metrics_path, dict(
                        iter=it, train_loss=f"{losses['train']:.4f}", val_loss=f"{losses['val']:.4f}",
                        lr=f"{learning_rate(it, cfg):.3e}", tokens_per_s=f"{tokens_per_s:.0f}",
                        elapsed_s=f"{time.perf_counter() - started:.1f}"))
                    plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
                    if writer:
                        writer.add_scalars("loss", losses, it)
                save(latest_path, it)
                if improved:
                    save(best_path, it)
                message = f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                (progress.write if progress else log)(message)
            if last:
                break
            if signals.received:
                save(latest_path, it)
                raise Interrupted(f"{signals.received} at iteration {it}: wrote {latest_path}; "
                                  f"continue with --resume")
            lr = learning_rate(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            positions = [data.sample_positions("train", cfg.batch_size, cfg.model.block_size, batch_generator)
                         for _ in range(cfg.grad_accum)]
            step_loss = torch.zeros((), device=device)
            for n, micro in enumerate(micro_steps):
                x, y = data.load_batch("train", positions[micro], cfg.model.block_size)
                sync = n == len(micro_steps) - 1 or ddp.world_size == 1
                with (contextlib.nullcontext() if sync else step_model.no_sync()):
                    with autocast_context(cfg.dtype, device):
                        _, loss = step_model(x.to(device), y.to(device))
                    (loss / len(micro_steps)).backward()
                step_loss += loss.detach() / len(micro_steps)
            if ddp.world_size > 1:
                dist.all_reduce(step_loss)
                step_loss /= ddp.world_size
            if not torch.isfinite(step_loss):
                raise FloatingPointError(f"loss became {step_loss.item()} at iteration {it}; the last "
                                         f"good checkpoint {latest_path} is left as it was")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            window_tokens += tokens_per_step
            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                now = time.perf_counter()
                tokens_per_s = window_tokens / (now - window_start)
                window_start, window_tokens = now, 0
                if writer:
                    writer.add_scalar("train/loss_step", step_loss.item(), it)
                    writer.add_scalar("train/lr", lr, it)
            if progress:
                progress.set_postfix(loss=f"{step_loss.item():.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                progress.update(1)
    if progress:
        progress.close()
    if writer:
        writer.close()
    return {"iters": it, "train_loss": losses["train"], "val_loss": losses["val"],
            "best_val_loss": best_val, "elapsed_s": time.perf_counter() - started,
            "params": model.num_params(), "ckpt": latest_path}


def main(argv=None):
    try:
        cfg = config_from_args(argv)
        result = train(cfg)
    except Interrupted as e:
        print(f"train: stopped by {e}", file=sys.stderr)
        return 130
    except (DataError, CheckpointError, BackendUnavailable, ValueError, FloatingPointError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result['iters']} iterations in {result['elapsed_s']:.0f} s; final train loss "
              f"{result['train_loss']:.4f}, val loss {result['val_loss']:.4f}; checkpoint {result['ckpt']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
