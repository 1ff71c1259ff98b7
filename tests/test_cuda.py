"""What runs only on a CUDA GPU: the extension's decode kernels (cache append and single-query attention)
against the reference cached attention, the model's cached forward on CUDA against its full forward, and
`generate` on CUDA with every sampler. Without a GPU every test here skips (tests/conftest.py); the GPU
check (`make gpu-check`) runs them.

Tolerances: fp32 throughout. The decode kernels sum at most 64 products per output in another order than
torch (1e-5 of the scale, as tests/op_check.py's fp32 bound); logits of the cached forward against the
full forward, 1e-4 absolute (logits of a few units, as tests/test_sampler.py). Greedy decoding must be
token-identical across samplers: the model's logits spread over several units, so no step is decided by
rounding.
"""
import pytest
import torch

from mingpt.ops import reference
from mingpt.sample import engine
from mingpt.sample.engine import generate, reference_generate
from mingpt.sample.settings import SamplingSettings
from test_sampler import spread_model

GREEDY = SamplingSettings.plain(temperature=0)

pytestmark = pytest.mark.cuda
DEVICE = "cuda"


def cuda_ops():
    from mingpt.ops import extension
    if extension._C is None or not extension._C.build_info()["cuda"]:
        pytest.fail(f"the GPU check needs mingpt._C built with CUDA: {extension.UNAVAILABLE_REASON or 'a CPU build'}")
    from mingpt.ops import cuda as module
    return module


def scaled_error(actual, truth) -> float:
    return ((actual.double() - truth.double()).abs().max() / truth.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("head_dim", [21, 32])
@pytest.mark.parametrize("start", [0, 16, 63])
def test_decode_attention_matches_reference(head_dim, start):
    """One query against a cache of start earlier positions: appended keys and values, and the output."""
    module = cuda_ops()
    B, H, capacity = 3, 4, 64
    torch.manual_seed(start)
    caches = [torch.randn(B, H, capacity, head_dim, device=DEVICE) for _ in range(2)]
    qkv = torch.randn(B, 1, 3 * H * head_dim, device=DEVICE)
    expected_caches = [c.clone() for c in caches]
    expected = reference.reference_cached_attention(qkv, H, *expected_caches, start)
    got = module.cached_attention(qkv, H, *caches, start)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert scaled_error(got, expected) <= 1e-5
    for cache, expected_cache in zip(caches, expected_caches):
        assert torch.equal(cache[:, :, :start + 1], expected_cache[:, :, :start + 1])


def test_decode_attention_refuses_bad_input():
    cuda_ops()
    cache = torch.zeros(1, 2, 8, 4, device=DEVICE)
    with pytest.raises((ValueError, RuntimeError), match="length"):
        torch.ops.mingpt.decode_attention(torch.zeros(1, 2, 1, 4, device=DEVICE), cache, cache, 9)
    with pytest.raises((TypeError, RuntimeError), match="float32"):
        torch.ops.mingpt.decode_attention(torch.zeros(1, 2, 1, 4, device=DEVICE).half(), cache, cache, 1)


def test_cached_forward_matches_full_forward():
    """Prefill 5 tokens, then decode one at a time to the block's end: every step's logits are the full
    forward's at that position."""
    cuda_ops()
    model = spread_model("odd").to(DEVICE)
    assert model.ops.sources["cached_attention"] == "cuda"
    block = model.config.block_size
    idx = torch.randint(model.config.vocab_size, (2, block), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.new_cache(2)
        steps = [model(idx[:, :5], cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], cache=cache, start=t)[0] for t in range(5, block)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-4)


SCHEDULES = {"plain": {}, "every control": dict(guidance=2.5, guidance_tokens=3, guidance_after=1.5,
                                                repetition_penalty=1.3, no_repeat_ngram_size=2)}


@pytest.mark.parametrize("controls", SCHEDULES)
def test_every_sampler_decodes_greedily_like_the_reference_on_cuda(controls):
    """Past the block (the window slides), with eos ending rows: reference, kvcache and cached agree."""
    cuda_ops()
    model = spread_model("odd").to(DEVICE)
    torch.manual_seed(3)
    idx = torch.randint(model.config.vocab_size, (4, 3), device=DEVICE)
    options = dict(settings=SamplingSettings.plain(temperature=0, **SCHEDULES[controls]))
    if controls != "plain":
        options["guidance_idx"] = (idx + 1) % model.config.vocab_size
    new_tokens = model.config.block_size + 4
    free = reference_generate(model, idx, new_tokens, GREEDY)
    eos = int(free[0, 8])
    expected = generate(model, idx, new_tokens, eos_id=eos, sampler="reference", **options)
    for name in ("kvcache", "cached"):
        assert torch.equal(generate(model, idx, new_tokens, eos_id=eos, sampler=name, **options), expected), name


@pytest.mark.parametrize("name", ["reference", "kvcache", "cached"])
def test_seeded_sampling_on_cuda_repeats_and_the_callback_retires_rows(name):
    cuda_ops()
    model = spread_model("odd").to(DEVICE)
    idx = torch.zeros((3, 2), dtype=torch.long, device=DEVICE)
    nucleus = SamplingSettings.plain(temperature=1.0, top_p=0.9)
    first = generate(model, idx, 10, nucleus, seed=7, sampler=name)
    assert first.device.type == "cuda" and first.shape == (3, 12)
    assert torch.equal(generate(model, idx, 10, nucleus, seed=7, sampler=name), first)
    columns = []

    def retire_row_one(column):
        columns.append(column)
        return [1]

    out = generate(model, idx, 10, SamplingSettings.plain(), seed=7, eos_id=0, sampler=name, callback=retire_row_one)
    assert (out[1, 3:] == 0).all() and len(columns) >= 1


def test_auto_sampler_on_cuda_is_cached():
    cuda_ops()
    assert engine.resolve_sampler("auto", spread_model("odd").to(DEVICE)) == "cached"
