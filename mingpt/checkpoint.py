"""Atomic checkpoint writes and safe loads (weights_only: a checkpoint can never run code), and `load`,
the one loader of every command: a checkpoint file, a run folder or a Hugging Face GPT-2 or GPT-NeoX folder."""
import dataclasses
import os
import pickle
import tempfile
import zipfile
from typing import Optional

import torch

from .config import GPTConfig
from .data.layouts import get_layout
from .hf import is_pretrained_dir, load_pretrained
from .model import GPT
from .tokenizer import tokenizer_from_dict

FORMAT = "mingpt-checkpoint-v1"
TMP_PREFIX = ".tmp-"  # atomic_write's temporary files; a process killed mid-write leaves one


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def atomic_write(path: str, write, suffix: str = ""):
    """Call write(binary file) on a temporary file in the same folder, fsync, then rename over `path`:
    a reader (or a kill -9) sees the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj, path: str):
    """torch.save through atomic_write."""
    atomic_write(path, lambda f: torch.save(obj, f), suffix=".pt")


def make_checkpoint(model: GPT, tokenizer, data_meta: dict, **state) -> dict:
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.config),
        "tokenizer": tokenizer.to_dict(),
        "data": {k: data_meta.get(k) for k in ("layout", "eos_token", "block_size", "source", "extra_train")},
        **state,
    }


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if os.path.isdir(path):
        candidate = os.path.join(path, "ckpt.pt")
        if not os.path.isfile(candidate):
            raise CheckpointError(f"{path} is a directory without ckpt.pt")
        path = candidate
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path} (train one with `python -m mingpt.train`)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or corrupt: not a torch.save zip archive")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data; refusing to "
                              f"load it (weights_only): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a mingpt checkpoint (expected format {FORMAT})")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str, device="cpu", backend="auto"):
    try:
        config = GPTConfig(**ckpt["model_config"])
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed config or tokenizer: {e}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model "
                              f"config says vocab_size {config.vocab_size}")
    model = GPT(config, backend=backend)
    state = ckpt["model"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path}: weights do not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(state)
    return model.to(device), tokenizer


@dataclasses.dataclass
class Loaded:
    """What `load` read: the model (eval mode), its tokenizer, what its data was (layout, eos_token, source,
    ...), and the checkpoint dict (None for a Hugging Face folder)."""
    model: GPT
    tokenizer: object
    data: dict
    checkpoint: Optional[dict]

    @property
    def layout(self):
        return get_layout(self.data["layout"])


def load(path: str, device="cpu", backend="auto") -> Loaded:
    """A model to use, from a checkpoint file, a run folder (its ckpt.pt) or a Hugging Face GPT-2 / GPT-NeoX folder
    (mingpt.export) with its tokenizer."""
    if is_pretrained_dir(path):
        model, tokenizer, data = load_pretrained(path, device=device, backend=backend, require_tokenizer=True)
        return Loaded(model, tokenizer, data, None)
    ckpt = load_checkpoint(path)
    model, tokenizer = model_from_checkpoint(ckpt, path, device, backend)
    return Loaded(model.eval(), tokenizer, ckpt["data"], ckpt)


def vocabulary_extends(base, tokenizer) -> bool:
    """Whether `tokenizer` keeps every id of `base` (equal, or a union vocabulary built from it)."""
    if base.kind != tokenizer.kind:
        return False
    if base.kind == "char":
        return tokenizer.itos[:len(base.itos)] == base.itos
    return base.to_dict() == tokenizer.to_dict()


def load_pretrained_weights(model: GPT, ckpt: dict, tokenizer, path: str):
    """Start fine-tuning from a checkpoint; rows of tokens new to the vocabulary keep their fresh init."""
    base = tokenizer_from_dict(ckpt["tokenizer"])
    if not vocabulary_extends(base, tokenizer):
        raise CheckpointError(
            f"{path}: its {base.kind} vocabulary of {base.vocab_size} does not match the data's "
            f"{tokenizer.kind} vocabulary of {tokenizer.vocab_size}; prepare the data with --vocab_from {path}")
    state = dict(ckpt["model"])
    fresh = model.state_dict()
    for name in ("transformer.wte.weight", "lm_head.weight"):
        rows = state[name]
        state[name] = torch.cat([rows, fresh[name][rows.shape[0]:]])
    model.load_state_dict(state)
