"""What the server says of itself: the model card of /v1/model_card, and the playground's page."""
import dataclasses
import os
from importlib import resources
from typing import Optional


def playground_html() -> str:
    return resources.files("mingpt.serve").joinpath("static/playground.html").read_text(encoding="utf-8")


def without_paths(value):
    """value with every string that names a file or folder cut to its last part: a public answer shows no
    local path."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return os.path.basename(value.rstrip("/\\").replace("\\", "/"))
    return value


def model_card(name: str, ckpt_path: str, model, tokenizer, data: dict, record: Optional[dict],
               decoder: str) -> dict:
    """What /v1/model_card says: the config, the vocabulary, the data and how training went (from the run's
    run.json where there is one); file names without their folders."""
    record = record or {}
    created = os.path.getmtime(ckpt_path) if os.path.exists(ckpt_path) else 0
    return without_paths({
        "id": name, "created": int(created), "config": dataclasses.asdict(model.config),
        "parameters": model.num_params(), "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.kind,
        "decoder": f"continuous batching, {decoder} decoder",
        "data": {**{k: v for k, v in data.items() if v is not None}, **(record.get("data") or {})},
        "training": {k: record[k] for k in ("status", "started", "ended", "iter", "losses", "best_val_loss")
                     if k in record}})
