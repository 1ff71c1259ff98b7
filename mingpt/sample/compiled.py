"""The glue to mingpt._C.KVSampler, the compiled CPU sampler: every step of every sample in C++, over
weights packed once (per weight format) and repacked only after they change."""
import dataclasses
import weakref

import torch

from ..ops import extension
from .settings import WEIGHT_FORMATS, SamplingSettings

# The interface version of mingpt._C.KVSampler this module was written for (its SAMPLER_VERSION).
SAMPLER_VERSION = 9
# The settings KVSampler.generate applies itself, by name (guide_against shaped guidance_idx; stop and
# weights are applied around it).
COMPILED_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "guidance", "guidance_tokens", "guidance_after",
                     "repetition_penalty", "no_repeat_ngram_size")
# Below this many bytes of weights a step's phases take microseconds, less than the barriers
# between threads cost: one thread is faster.
PARALLEL_MIN_BYTES = 1 << 20

# model -> {weight format: (parameter key, mingpt._C.KVSampler)}: packed weights live as long as their model.
_packed_samplers = weakref.WeakKeyDictionary()


def packed_sampler(model, weights="fp32"):
    """The model's weights packed (quantised once) in format `weights` for the compiled sampler, packed
    again only after they change."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    key = (dataclasses.astuple(model.config),
           tuple((p.data_ptr(), p._version) for p in model.parameters()))
    formats = _packed_samplers.setdefault(model, {})
    hit = formats.get(weights)
    if hit is not None and hit[0] == key:
        return hit[1]
    sampler = extension.require_extension().KVSampler(model.state_dict(), dataclasses.asdict(model.config),
                                                      weight_format=weights)
    formats[weights] = (key, sampler)
    return sampler


def cached_generate(model, idx, max_new_tokens, settings: SamplingSettings, eos_id=None, seed=None, callback=None,
                    guidance_idx=None):
    """One call into mingpt._C.KVSampler (CPU) with the weights in format settings.weights; without a seed,
    torch's global generator draws one."""
    if seed is None:
        seed = int(torch.randint(2 ** 62, (1,)))
    sampler = packed_sampler(model, settings.weights)
    threads = torch.get_num_threads() if sampler.packed_bytes >= PARALLEL_MIN_BYTES else 1
    return sampler.generate(idx, max_new_tokens, eos_id=-1 if eos_id is None else eos_id, seed=seed % 2 ** 64,
                            num_threads=threads, callback=callback,
                            guidance_idx=guidance_idx if settings.guided else None,
                            **{name: getattr(settings, name) for name in COMPILED_SETTINGS})


def cached_sampler_unavailable_reason(model=None):
    """None when the cached sampler can run (for `model`, if given), else why not."""
    _C = extension._C
    if _C is None:
        return extension.UNAVAILABLE_REASON
    if getattr(_C, "SAMPLER_VERSION", None) != SAMPLER_VERSION:
        return (f"mingpt._C is a stale build (its KV-cached sampler is version "
                f"{getattr(_C, 'SAMPLER_VERSION', 'none')}, this code needs {SAMPLER_VERSION}); "
                f"{extension.REBUILD_HINT}")
    if model is None:
        return None
    weight = model.transformer.wte.weight
    if weight.dtype != torch.float32:
        return f"the cached sampler runs float32 weights; this model's are {weight.dtype}"
    if weight.device.type == "cuda" and not _C.build_info()["cuda"]:
        return f"mingpt._C was built without CUDA, and the model is on {weight.device}"
    if weight.device.type not in ("cpu", "cuda"):
        return f"the cached sampler runs on the CPU or CUDA, not {weight.device}"
    return None
