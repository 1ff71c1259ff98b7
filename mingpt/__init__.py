"""mingpt: a small character-level GPT for sentiment-labelled Chinese reviews."""
from .checkpoint import load_model
from .config import GPTConfig, TrainConfig
from .model import GPT, KVCache
from .sampling import generate

__all__ = ["GPT", "GPTConfig", "KVCache", "TrainConfig", "generate", "load_model"]
