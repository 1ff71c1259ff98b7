"""mingpt: a small character-level GPT for sentiment-labelled Chinese reviews.

The public API: the model (GPT, GPTConfig, KVCache), the training configuration (TrainConfig), `load`
(a checkpoint file, a run folder or a Hugging Face folder), and sampling (SamplingSettings, generate for
token rows, write_samples for reviews as text). The commands are `python -m mingpt.prepare`, `.train`,
`.sample`, `.evaluate`, `.export`, `.serve` and `.bench`."""
from .checkpoint import Loaded, load
from .config import GPTConfig, TrainConfig
from .model import GPT, KVCache
from .sample import SamplingSettings, generate, write_samples

__all__ = ["GPT", "GPTConfig", "KVCache", "Loaded", "SamplingSettings", "TrainConfig", "generate", "load",
           "write_samples"]
