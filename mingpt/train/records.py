"""A run's folder and its record.

- `claim_out_dir`: a new run never lands on another. A folder that holds a run's checkpoint or
  metrics is refused with what was found and the choices (--resume, another --out_dir,
  --overwrite); --overwrite moves the old run to out_dir/previous/<its last write>/, never deletes it.
- out_dir/run.json: how the run was made (resolved config, command line, data, versions, backend,
  sampler, threads) and how it went (times, status, losses, the last evaluation's samples), written
  atomically at the start, at every evaluation and at the end, so it reads whole mid-run and after a kill -9.
"""
import csv
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from importlib import metadata
from typing import Optional

import numpy as np
import torch

from ..ops import extension
from ..checkpoint import CheckpointError, atomic_write, load_checkpoint

RUN_MARKERS = ("ckpt.pt", "best.pt", "metrics.csv")  # a folder holding any of these holds a run
RUN_FILES = RUN_MARKERS + ("loss.png", "run.json", "tensorboard", "data")  # what --overwrite moves aside
PREVIOUS = "previous"
RECORD = "run.json"


class RunExists(ValueError):
    """out_dir holds a run that a new one would overwrite; the message says what was found and the choices."""


def _last_written(out_dir: str, names) -> float:
    return max(os.path.getmtime(os.path.join(out_dir, name)) for name in names)


def _progress_from_metrics(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = [row for row in csv.DictReader(f) if row.get("val_loss")]
        best = min(float(row["val_loss"]) for row in rows) if rows else None
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, KeyError):
        return None
    if best is None:
        return None
    return f"iter {rows[-1].get('iter')}, val loss {float(rows[-1]['val_loss']):.4f}, best {best:.4f}"


def _progress_from_checkpoint(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        return "its ckpt.pt is unreadable"
    return f"iter {ckpt.get('iter_num')}, best val loss {float(ckpt.get('best_val_loss', math.inf)):.4f}"


def describe_run(out_dir: str, found) -> str:
    """'iter 40, val loss 2.3107, best 2.2950, last written 2025-06-01 12:03' from metrics.csv, else ckpt.pt."""
    progress = (_progress_from_metrics(os.path.join(out_dir, "metrics.csv"))
                or _progress_from_checkpoint(os.path.join(out_dir, "ckpt.pt")))
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(_last_written(out_dir, found)))
    return f"{progress + ', ' if progress else ''}last written {when}"


def refusal(out_dir: str, found) -> RunExists:
    choices = ["--resume            continue that run from its ckpt.pt"] if "ckpt.pt" in found else []
    choices += ["--out_dir NEW_DIR   start the new run in another folder",
                f"--overwrite         start anew here; the old run is moved to "
                f"{os.path.join(out_dir, PREVIOUS, 'DATE_TIME')}, nothing is deleted"]
    return RunExists(f"{out_dir} already holds a run ({describe_run(out_dir, found)}); a new run would "
                     f"overwrite its {', '.join(found)}. Choose one:\n" + "\n".join(f"  {c}" for c in choices))


def move_aside(out_dir: str, found) -> str:
    """Move the run's files to out_dir/previous/<time of its last write>/; returns that folder."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(_last_written(out_dir, found)))
    dest, n = os.path.join(out_dir, PREVIOUS, stamp), 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(out_dir, PREVIOUS, f"{stamp}_{n}")
    os.makedirs(dest)
    for name in RUN_FILES:
        if os.path.lexists(os.path.join(out_dir, name)):
            os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
    return dest


def claim_out_dir(out_dir: str, resume: bool, overwrite: bool, is_main: bool) -> Optional[str]:
    """Refuse to start a new run over another in out_dir, or (overwrite) move that run aside on the main
    process; returns the folder it was moved to, else None. --resume continues the run that is there."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in out_dir and --overwrite moves it aside: choose one")
    found = [] if resume else [name for name in RUN_MARKERS if os.path.exists(os.path.join(out_dir, name))]
    if not found:
        return None
    if not overwrite:
        raise refusal(out_dir, found)
    return move_aside(out_dir, found) if is_main else None


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def finite(x) -> Optional[float]:
    """JSON has no infinity or NaN: such a loss is recorded as null."""
    return float(x) if x is not None and math.isfinite(x) else None


def versions() -> dict:
    try:
        version = metadata.version("mingpt")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    _C = extension._C
    built = ({"loaded": True, **_C.build_info(), "sampler_version": getattr(_C, "SAMPLER_VERSION", None)}
             if _C is not None else {"loaded": False, "reason": extension.UNAVAILABLE_REASON})
    return {"mingpt": version, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "extension": built}


def data_summary(data_dir: str, meta: dict, balance: str) -> dict:
    keys = ("source", "read_as", "layout", "tokenizer", "vocab_size", "reviews", "positive", "negative")
    return {"data_dir": data_dir, **{k: meta.get(k) for k in keys}, "balance": balance,
            "split": {"seed": meta.get("seed"), "val_fraction": meta.get("val_fraction"), **meta.get("splits", {})}}


def read_record(out_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(out_dir, RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def new_record(config: dict, data: dict, setup: dict, resumed_at: Optional[int], out_dir: str) -> dict:
    """The record of a run starting now; a resumed run keeps its first command and start and lists each resume."""
    started, command = now(), shlex.join(getattr(sys, "orig_argv", sys.argv))
    record = {"status": "running", "command": command, "cwd": os.getcwd(), "started": started, "updated": started,
              "ended": None, "config": config, "data": data, **setup, "versions": versions(),
              "threads": {"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                          "cpus": os.cpu_count()},
              "iter": resumed_at or 0, "losses": None, "best_val_loss": None, "samples": None, "resumes": []}
    earlier = read_record(out_dir) if resumed_at is not None else None
    if earlier:
        record.update({k: earlier[k] for k in ("command", "cwd", "started", "losses", "best_val_loss", "resumes")
                       if k in earlier})
        record["resumes"] = list(record["resumes"]) + [{"at": started, "iter": resumed_at, "command": command}]
    return record


def record_evaluation(record: dict, it: int, losses: dict, best_val: float, samples):
    record.update(status="running", updated=now(), iter=it, best_val_loss=finite(best_val),
                  losses={split: finite(loss) for split, loss in losses.items()},
                  samples=[{"sentiment": s, "text": text} for s, text in samples] or None)


def record_end(record: dict, status: str):
    record.update(status=status, updated=now(), ended=now())


def write_record(out_dir: str, record: dict):
    data = json.dumps(record, ensure_ascii=False, indent=2, allow_nan=False).encode("utf-8")
    atomic_write(os.path.join(out_dir, RECORD), lambda f: f.write(data), suffix=".json")
