"""Property tests of the compiled sampler's inputs: good ones give well-formed output, bad ones a clear error."""
import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mingpt import GPT, GPTConfig
from mingpt.sample import compiled, engine
from mingpt.sample.compiled import packed_sampler
from mingpt.sample.settings import WEIGHT_FORMATS
from mingpt.sample.settings import SamplingSettings

GREEDY = SamplingSettings.plain(temperature=0)

pytestmark = pytest.mark.skipif(compiled.cached_sampler_unavailable_reason() is not None,
                                reason=f"{compiled.cached_sampler_unavailable_reason()}")
CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=20, block_size=10, vocab_size=17)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_model(config=CONFIG):
    torch.manual_seed(0)
    return GPT(config).eval()


MODEL = make_model()


def kv_sampler(weights, config=CONFIG, weight_format="fp32", portable=False):
    from mingpt.ops.extension import require_extension
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return require_extension().KVSampler(weights, config, weight_format=weight_format, portable=portable)


# Every weight format with every kernel that reads it (the portable one, and the build's best).
VARIANTS = [(w, False) for w in WEIGHT_FORMATS] + [("bf16", True), ("int8", True)]
each_variant = pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}{'-portable' if v[1] else ''}")


def variant_sampler(variant):
    weights, portable = variant
    return packed_sampler(MODEL, weights) if not portable else kv_sampler(MODEL.state_dict(), CONFIG, weights, True)


@st.composite
def prompts(draw, max_batch=4):
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, CONFIG.block_size))
    ids = draw(st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=batch * length, max_size=batch * length))
    return torch.tensor(ids, dtype=torch.long).view(batch, length)


@SETTINGS
@given(idx=prompts(), max_new=st.integers(0, 14), temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
       top_k=st.one_of(st.none(), st.integers(0, CONFIG.vocab_size + 3)),
       top_p=st.one_of(st.none(), st.floats(1e-3, 1.0)),
       eos=st.one_of(st.none(), st.integers(0, CONFIG.vocab_size - 1)), seed=st.integers(-2 ** 70, 2 ** 70))
@each_variant
def test_good_inputs_give_well_formed_samples(variant, idx, max_new, temperature, top_k, top_p, eos, seed):
    weights, portable = variant
    if portable:
        out = variant_sampler(variant).generate(idx, max_new, temperature, top_k or 0, 1.0 if top_p is None else top_p,
                                                -1 if eos is None else eos, seed % 2 ** 64, num_threads=2)
    else:
        settings = SamplingSettings.plain(temperature=temperature, top_k=top_k or 0,
                                          top_p=1.0 if top_p is None else top_p, weights=weights)
        out = engine.generate(MODEL, idx, max_new, settings, eos_id=eos, seed=seed, sampler="cached")
    batch, length = idx.shape
    assert out.dtype == torch.long and out.shape[0] == batch and length <= out.shape[1] <= length + max_new
    assert torch.equal(out[:, :length], idx)
    assert int(out.min()) >= 0 and int(out.max()) < CONFIG.vocab_size
    new = out[:, length:]
    if eos is None:
        assert new.shape[1] == max_new
    else:
        hit = new == eos
        after_first = hit.cumsum(1) > 0
        assert bool(hit[after_first].all()), "a row that emitted eos must be padded with it"
        assert new.shape[1] == max_new or bool(after_first[:, -1].all())
    if top_k == 1 or (top_p is not None and top_p < 1e-2) or temperature == 0:
        # One token is left to draw from: the likeliest (by logits within fp32 ties, which random
        # init does not produce), so sampling is greedy: the reference's for fp32 weights.
        greedy = variant_sampler(variant).generate(idx, max_new, temperature=0, eos_id=-1 if eos is None else eos,
                                                   num_threads=1)
        assert torch.equal(out, greedy)
        if variant == ("fp32", False):
            assert torch.equal(out, engine.reference_generate(MODEL, idx, max_new, GREEDY, eos_id=eos))


@SETTINGS
@given(idx=prompts(max_batch=2))
@each_variant
def test_non_contiguous_prompts_are_read_correctly(variant, idx):
    wide = torch.stack([idx, torch.zeros_like(idx)], dim=2)[:, :, 0]  # stride 2 in the last dim
    assert not wide.is_contiguous() or idx.shape[1] == 1
    sampler = variant_sampler(variant)
    assert torch.equal(sampler.generate(wide, 5, temperature=0, num_threads=1),
                       sampler.generate(idx, 5, temperature=0, num_threads=1))


@SETTINGS
@given(dtype=st.sampled_from([torch.float32, torch.float64, torch.int32, torch.int16, torch.uint8, torch.bool]),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 4)))
@each_variant
def test_prompt_of_another_dtype_is_a_type_error(variant, dtype, shape):
    with pytest.raises(TypeError, match="int64"):
        variant_sampler(variant).generate(torch.zeros(shape, dtype=dtype), 3)


@SETTINGS
@given(shape=st.one_of(st.tuples(st.integers(0, 5)), st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
                       st.tuples(st.just(0), st.integers(1, 5)), st.tuples(st.integers(1, 5), st.just(0))))
@each_variant
def test_prompt_of_a_wrong_shape_is_a_value_error(variant, shape):
    with pytest.raises(ValueError, match="shape"):
        variant_sampler(variant).generate(torch.zeros(shape, dtype=torch.long), 3)


@SETTINGS
@given(extra=st.integers(1, 20), batch=st.integers(1, 3))
@each_variant
def test_prompt_longer_than_the_block_is_a_value_error(variant, extra, batch):
    with pytest.raises(ValueError, match="block size"):
        variant_sampler(variant).generate(torch.zeros((batch, CONFIG.block_size + extra), dtype=torch.long), 3)


@SETTINGS
@given(token=st.one_of(st.integers(-2 ** 40, -1), st.integers(CONFIG.vocab_size, 2 ** 40)))
@each_variant
def test_token_ids_outside_the_vocabulary_are_a_value_error(variant, token):
    with pytest.raises(ValueError, match="outside"):
        variant_sampler(variant).generate(torch.tensor([[1, token]]), 3)


INT64 = dict(min_value=-2 ** 63, max_value=2 ** 63 - 1)  # wider ints fail pybind's conversion (a TypeError)
BAD_OPTIONS = st.one_of(
    st.fixed_dictionaries({"top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                                              st.just(math.nan))}),
    st.fixed_dictionaries({"top_k": st.integers(INT64["min_value"], -1)}),
    st.fixed_dictionaries({"temperature": st.one_of(st.floats(max_value=-1e-9),
                                                    st.sampled_from([math.nan, math.inf]))}),
    st.fixed_dictionaries({"max_new_tokens": st.integers(INT64["min_value"], -1)}),
    st.fixed_dictionaries({"eos_id": st.one_of(st.integers(INT64["min_value"], -2),
                                               st.integers(CONFIG.vocab_size, INT64["max_value"]))}),
    st.fixed_dictionaries({"num_threads": st.one_of(st.integers(INT64["min_value"], -1),
                                                    st.integers(1025, INT64["max_value"]))}),
)


@SETTINGS
@given(options=BAD_OPTIONS)
@each_variant
def test_bad_options_are_a_value_error_naming_the_option(variant, options):
    name = next(iter(options))
    args = {"max_new_tokens": 3, **options}
    with pytest.raises(ValueError, match=name):
        variant_sampler(variant).generate(torch.zeros((1, 2), dtype=torch.long), **args)


@each_variant
def test_a_callback_that_cannot_be_called_is_a_type_error(variant):
    with pytest.raises(TypeError, match="callback"):
        variant_sampler(variant).generate(torch.zeros((1, 2), dtype=torch.long), 3, callback=42)


# Every change that shows in the weights. n_head does not (the same tensors split into other
# heads), so a state dict cannot reveal it; mingpt.sample.compiled always passes the model's own config.
OTHER_CONFIGS = st.sampled_from([dict(n_layer=2), dict(n_embd=24), dict(block_size=12), dict(vocab_size=19),
                                 dict(bias=False)])


@settings(max_examples=12, deadline=None)
@given(change=OTHER_CONFIGS)
@each_variant
def test_weights_of_another_config_are_a_value_error(variant, change):
    """The packed weights must be exactly the config's: wrong shapes, missing or extra names are refused."""
    other = make_model(dataclasses.replace(CONFIG, **change))
    with pytest.raises(ValueError, match="weight"):
        kv_sampler(other.state_dict(), CONFIG, *variant)
    with pytest.raises(ValueError, match="weight"):
        kv_sampler(MODEL.state_dict(), dataclasses.replace(CONFIG, **change), *variant)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@each_variant
def test_weights_of_another_dtype_are_a_type_error(variant, dtype):
    with pytest.raises(TypeError, match="float32"):
        kv_sampler({k: v.to(dtype) for k, v in MODEL.state_dict().items()}, CONFIG, *variant)


@pytest.mark.parametrize("weights", ["fp16", "", "INT8"])
def test_unknown_weight_format_is_a_value_error(weights):
    with pytest.raises(ValueError, match="weight_format"):
        kv_sampler(MODEL.state_dict(), CONFIG, weights)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_int8_refuses_weights_it_cannot_scale(bad):
    broken = {k: v.clone() for k, v in MODEL.state_dict().items()}
    broken["transformer.h.0.mlp.c_fc.weight"][3, 4] = bad
    with pytest.raises(ValueError, match="finite"):
        kv_sampler(broken, CONFIG, "int8")


def test_untied_or_non_tensor_weights_are_refused():
    weights = dict(MODEL.state_dict())
    weights["lm_head.weight"] = weights["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="tied"):
        kv_sampler(weights)
    weights = dict(MODEL.state_dict())
    weights["transformer.wpe.weight"] = "not a tensor"
    with pytest.raises(TypeError):
        kv_sampler(weights)


def config_with(**changes):
    return {**dataclasses.asdict(CONFIG), **changes}


def test_config_that_cannot_exist_is_a_value_error():
    with pytest.raises(ValueError, match="divisible"):
        kv_sampler(MODEL.state_dict(), config_with(n_head=3))
    with pytest.raises(ValueError, match="'n_layer' must be >= 1"):
        kv_sampler(MODEL.state_dict(), config_with(n_layer=0))
    with pytest.raises(ValueError, match="'layer_norm_eps' must be > 0"):
        kv_sampler(MODEL.state_dict(), config_with(layer_norm_eps=0.0))


@pytest.mark.parametrize("key", ["n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "layer_norm_eps"])
def test_missing_config_key_is_a_value_error_naming_it(key):
    config = dataclasses.asdict(CONFIG)
    del config[key]
    with pytest.raises(ValueError, match=f"missing '{key}'"):
        kv_sampler(MODEL.state_dict(), config)


@pytest.mark.parametrize("key, value", [("n_layer", 1.0), ("n_head", "2"), ("n_embd", True), ("block_size", None),
                                        ("vocab_size", 17.5), ("bias", 1), ("layer_norm_eps", "1e-5")])
def test_ill_typed_config_value_is_a_type_error_naming_it(key, value):
    with pytest.raises(TypeError, match=f"'{key}' must be"):
        kv_sampler(MODEL.state_dict(), config_with(**{key: value}))


def test_unknown_config_key_is_refused_and_dropout_ignored():
    with pytest.raises(ValueError, match="'rotary'"):
        kv_sampler(MODEL.state_dict(), config_with(rotary=True))
    idx = torch.zeros((1, 2), dtype=torch.long)
    greedy = kv_sampler(MODEL.state_dict()).generate(idx, 5, temperature=0)
    assert torch.equal(kv_sampler(MODEL.state_dict(), config_with(dropout=0.5)).generate(idx, 5, temperature=0), greedy)
