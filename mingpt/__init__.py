"""mingpt: a small character-level GPT for sentiment-labelled Chinese reviews."""
from .config import GPTConfig, TrainConfig
from .model import GPT

__all__ = ["GPT", "GPTConfig", "TrainConfig"]
