"""What a training run holds from one step to the next (Run), and how it is set up, saved and restored:
data (prepared from --csv first), model (fresh or --init_from), optimizers, out_dir checks, run.json,
and the checkpoint a run resumes from exactly (weights, optimizers, every RNG, the packer's queue, the passes)."""
import contextlib
import copy
import dataclasses
import glob
import os
import random
import shutil
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import (TMP_PREFIX, CheckpointError, atomic_torch_save, load_checkpoint, load_pretrained_weights,
                          make_checkpoint)
from ..config import GPTConfig, TrainConfig, apply_overrides
from ..data.corpus import EMBEDDED_CORPUS, load_embedded_corpus, load_table
from ..data.tokens import TokenData, write_data_dir, summary_line
from ..model import GPT
from ..ops import extension
from ..optim import newton_schulz_dtype
from ..runtime import Distributed, autocast_context, resolve_dtype
from ..sample.compiled import cached_sampler_unavailable_reason
from ..tokenizer import TOKENIZERS
from .records import claim_out_dir, data_summary, new_record, record_end, write_record


# Held-out reviews scored for nats per character at each evaluation (all of them up to this many).
NATS_PER_CHAR_REVIEWS = 1000


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
    """The run's TokenData: cfg.data_dir, or (without one) the reviews of cfg.csv or of the embedded corpus
    prepared into out_dir/data first (claiming out_dir before writing there: the folder the claim moved an
    earlier run to is returned), and a note for the log when corpus_share has no embedded-corpus reviews to
    draw."""
    moved = None
    if cfg.data_dir is None:
        moved = claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite, ddp.is_main)
        cfg.data_dir = os.path.join(cfg.out_dir, "data")
        if not cfg.resume and ddp.is_main:
            print(summary_line(prepare_data(cfg)))
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


def prepare_data(cfg: TrainConfig) -> dict:
    """Token files in cfg.data_dir (as `prepare` makes them, for the model's block size) from the labelled
    reviews of cfg.csv, with the embedded corpus added to the train split when corpus_share asks for it; or,
    without a csv, from the embedded corpus alone."""
    tokens = dict(block_size=cfg.model.block_size, tokenizer=cfg.tokenizer, bpe_vocab_size=cfg.bpe_vocab_size)
    if cfg.csv is None:
        reviews, drops = load_embedded_corpus()
        return write_data_dir(reviews, drops, cfg.data_dir, source=EMBEDDED_CORPUS, **tokens)
    reviews, drops, read_as = load_table(cfg.csv)
    extra = load_embedded_corpus()[0] if cfg.corpus_share else ()
    return write_data_dir(reviews, drops, cfg.data_dir, source=cfg.csv, read_as=read_as, extra_train=extra,
                          extra_source=EMBEDDED_CORPUS, **tokens)


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
    budget runs from clock_start (a perf_counter reading; default: now). The run holds its own copy of cfg,
    with what set-up resolves in it (data_dir of --csv, the vocabulary, --init_from's architecture)."""
    clock_start = time.perf_counter() if clock_start is None else clock_start
    cfg = copy.deepcopy(cfg)
    cfg.check()
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {cfg.tokenizer!r}")
    cfg.dtype, dtype_reason = resolve_dtype(cfg.dtype, device)
    autocast_context(cfg.dtype, device)  # rejects a dtype the device cannot train in, before any work
    if cfg.grad_accum % ddp.world_size:
        raise ValueError(f"grad_accum {cfg.grad_accum} must be a multiple of the {ddp.world_size} processes")
    prepares_data = cfg.data_dir is None  # into out_dir/data, which load_data claims first
    data, moved, corpus_note = load_data(cfg, ddp)
    balance = data.set_balance(cfg.balance)
    if cfg.sentiment_dropout and not (0 < cfg.sentiment_dropout < 1 and data.layout.balances_classes):
        raise ValueError(f"sentiment_dropout must be in [0, 1) and needs the review layout, got "
                         f"{cfg.sentiment_dropout} with the {data.layout.name} layout")
    data.set_packing(cfg.pack)
    data.set_reshuffle(cfg.reshuffle)
    model = build_model(cfg, data, device)
    if not prepares_data:
        moved = claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite, ddp.is_main)
    if ddp.is_main:
        # latest + best + their temporary copies, each weights and two AdamW moments
        check_out_dir(cfg.out_dir, needed_bytes=4 * 3 * 4 * model.num_params())
    run = Run(cfg, ddp, device, data, model, step_model=model,
              optimizers=model.configure_optimizers(
                  cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), cfg.optimizer,
                  muon_dtype=newton_schulz_dtype(cfg.dtype)),
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
            f"device {device}, dtype {cfg.dtype} ({dtype_reason}), {ddp.world_size} process(es), backend {cfg.backend} -> "
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
    run.data.restore_pass_order_state(resumed.get("pass_orders", []))
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
            packer_waiting=list(run.data.packer.waiting) if run.data.packer is not None else [],
            pass_orders=run.data.pass_order_state(), ema=run.ema),
            run.path(name))


def time_share(run: Run) -> float:
    """The share of the max_minutes budget spent, less the time the final evaluation will take (0 without one)."""
    if run.cfg.max_minutes is None:
        return 0.0
    return (time.perf_counter() - run.clock_start) / max(1e-9, 60 * run.cfg.max_minutes - run.eval_seconds)
