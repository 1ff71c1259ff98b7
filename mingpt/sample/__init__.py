"""Sampling: the settings every sampler takes (settings), the decode engine and its samplers (engine),
the compiled CPU sampler's glue (compiled), the logit controls (controls), review prompts and text
(reviews) and streaming text (streaming). `python -m mingpt.sample` is the command (__main__)."""
from .engine import SAMPLERS, generate
from .reviews import write_samples
from .settings import SamplingSettings

__all__ = ["SAMPLERS", "SamplingSettings", "generate", "write_samples"]
