"""Train a GPT: `python -m mingpt.train --preset speedrun --csv REVIEWS.csv --out_dir DIR`, or on prepared token
files with --data_dir DIR (python -m mingpt.prepare); with neither, on the embedded corpus.

Writes out_dir/ckpt.pt (the latest, at every evaluation) and out_dir/best.pt (best val loss), both
atomically, plus out_dir/metrics.csv, out_dir/loss.png and out_dir/run.json (how the run was made and
how it went). An out_dir that holds another run is refused: --resume it, choose another --out_dir, or
--overwrite (which moves the old run to out_dir/previous/). SIGINT/SIGTERM write a checkpoint and exit.
Multi-process: `torchrun --nproc_per_node=N -m mingpt.train ...` (DistributedDataParallel, gloo on
CPU, NCCL on CUDA); the global batch is batch_size x grad_accum, split across the ranks.
"""
import argparse
import os
import sys

from ..checkpoint import CheckpointError
from ..config import (PRESETS, GPTConfig, TrainConfig, add_dataclass_arguments, apply_overrides, collect_overrides,
                     load_config_file, preset_config)
from ..data.corpus import DataError
from ..ops import BACKENDS, BackendUnavailable
from .loop import Interrupted, train

HELP = {
    "data_dir": "prepared data (python -m mingpt.prepare); without it, train prepares --csv, or else the embedded "
                "corpus, into out_dir/data", "out_dir": "checkpoints, metrics and plot",
    "preset": f"model and schedule preset: {', '.join(PRESETS)}", "backend": f"ops backend: {', '.join(BACKENDS)}",
    "device": "auto, cpu, cuda or cuda:N",
    "dtype": "float32, bfloat16 (autocast), float16 (CUDA autocast), or auto: bfloat16 where it is faster (a GPU "
             "that has it, a CPU whose bf16 matmuls measure faster), else float32",
    "seed": "seed of initialisation, batches and dropout", "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step, over all processes", "max_iters": "optimizer steps in all",
    "learning_rate": "peak learning rate", "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "linear warmup steps", "lr_decay_iters": "steps of the cosine decay (None: max_iters)",
    "weight_decay": "AdamW weight decay on matrices", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0: off)", "eval_interval": "steps between evaluations and checkpoints",
    "eval_minutes": "minutes between evaluations and checkpoints, counted from the start (instead of eval_interval)",
    "eval_iters": "batches per split in an evaluation", "log_interval": "steps between tokens/s updates",
    "max_minutes": "stop after this many minutes of the whole command, the final evaluation and checkpoint "
                   "included",
    "resume": "continue exactly from out_dir/ckpt.pt",
    "overwrite": "start a new run in an out_dir that holds another: move that run to out_dir/previous/ first "
                 "(without it such an out_dir is refused)",
    "eval_sample_tokens": "length of the sample printed per sentiment at each evaluation (0: none)",
    "init_from": "fine-tune: start from this checkpoint's weights and architecture (a fresh optimizer and schedule)",
    "balance": "review layout: oversample the minority sentiment (auto: when it is under 35%%), on or off",
    "sentiment_dropout": "review layout: the share of training reviews whose sentiment token is replaced by "
                         "<pad>, so the model also learns reviews without one (for sample --guide_against none)",
    "pack": "review layout: pack several whole reviews into each training row (no compute on padding; "
            "attention stays within a review and positions restart at each)",
    "reshuffle": "review layout: draw the training reviews without replacement, every review once a pass (of "
                 "each source and, when balancing, each sentiment) in a fresh order each pass",
    "optimizer": "adamw, or muon (Muon for the blocks' weight matrices, AdamW for embeddings and vectors)",
    "schedule": "cosine (warmup, cosine decay over max_iters) or wsd (warmup, stable, then a linear decay over "
                "the last decay_fraction of max_iters or of the max_minutes budget, whichever ends first)",
    "decay_fraction": "wsd: the share of the run spent decaying the learning rate to min_lr",
    "ema_decay": "evaluate and keep in best.pt an exponential moving average of the weights with this decay "
                 "per step (0: off); the log also gives the model's own weights' figure",
    "tensorboard": "also log to out_dir/tensorboard",
    "progress": "show a progress bar", "threads": "torch CPU threads per process (None: torch's default)",
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_embd": "embedding width",
    "block_size": "context length", "dropout": "dropout rate", "bias": "biases in linear layers and norms",
    "layer_norm_eps": "epsilon added to the variance in every layer norm",
    "tokenizer": "with --csv (or no data_dir): char (one token per character) or bpe (byte-level BPE)",
    "bpe_vocab_size": "vocabulary size of --tokenizer bpe",
    "norm": "layernorm or rmsnorm (no mean and no bias)",
    "positions": "learned (a position embedding) or rotary (queries and keys rotated by position)",
    "qk_norm": "RMS-normalise each head's queries and keys (with a learned gain)",
    "mlp": "the MLP's activation: gelu (tanh approximation) or relu2 (ReLU squared)",
    "tie_head": "the output head shares the token embedding (off: a head of its own)",
    "bigram_buckets": "add an embedding of each (previous token, token) pair, hashed into this many rows (0: off)",
    "logit_softcap": "cap the logits smoothly at this value, cap * tanh(logits / cap) (0: off)",
}


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
    from_file = load_config_file(args.config) if args.config else {}
    from_flags = collect_overrides(args, TrainConfig)
    cfg = preset_config(args.preset or TrainConfig.preset, from_flags.get("max_minutes", from_file.get("max_minutes")))
    apply_overrides(cfg, from_file, args.config)
    apply_overrides(cfg, from_flags, "command line")
    apply_overrides(cfg.model, collect_overrides(args, GPTConfig), "command line")
    cfg.check()
    return cfg


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
