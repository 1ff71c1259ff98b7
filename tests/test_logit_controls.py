"""Guidance, repetition penalty and no-repeat n-grams: hand-made logits with known answers, Hugging
Face's logits processors, and every sampler taking the same greedy tokens under them."""
import math

import pytest
import torch

from mingpt import GPT, GPTConfig
from mingpt.sample import compiled
from mingpt.sample.controls import apply_controls, banned_ngram_tokens, guide
from mingpt.sample.engine import generate
from mingpt.sample.compiled import packed_sampler
from mingpt.sample.settings import SamplingSettings

GREEDY = SamplingSettings.plain(temperature=0)

requires_cached = pytest.mark.skipif(compiled.cached_sampler_unavailable_reason() is not None,
                                     reason=f"{compiled.cached_sampler_unavailable_reason()}")
NEG_INF = float("-inf")


def test_guidance_pushes_log_probabilities_away_from_the_second_conditioning():
    first = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    second = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.25)]])
    guided = guide(torch.cat([first, second]), 3.0)
    # log 0.5 + 3 (log 0.25 - log 0.5)... per token: second + 3 (first - second)
    expected = torch.tensor([[math.log(0.25) + 3 * math.log(2), math.log(0.5) - 3 * math.log(2), math.log(0.25)]])
    torch.testing.assert_close(guided, expected)
    torch.testing.assert_close(guide(torch.cat([first + 7.0, second - 2.0]), 1.0), first)  # shift-free
    torch.testing.assert_close(guide(torch.cat([first, second]), 0.0), second)


def test_guidance_scales_the_first_guidance_tokens_then_guidance_after():
    controls = SamplingSettings.plain(guidance=8.0, guidance_tokens=3, guidance_after=1.5)
    assert [controls.guidance_at(step) for step in range(5)] == [8.0, 8.0, 8.0, 1.5, 1.5]
    plain = SamplingSettings.plain
    assert [plain(guidance=8.0, guidance_after=1.5).guidance_at(step) for step in (0, 50)] == [8.0, 8.0]
    assert plain(guidance_tokens=3, guidance_after=2.0).guided  # off at first, on from the 4th token
    assert not plain(guidance_tokens=3).guided and not plain(guidance_after=2.0).guided
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    history = torch.zeros((2, 5), dtype=torch.long)
    torch.testing.assert_close(apply_controls(logits, history, controls, step=2), guide(logits, 8.0))
    torch.testing.assert_close(apply_controls(logits, history, controls, step=3), guide(logits, 1.5))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    history = torch.tensor([[0, 1, 0]])  # token 0 twice: penalised once
    out = apply_controls(logits, history, SamplingSettings.plain(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]


@pytest.mark.parametrize("row, n, banned", [
    ([5, 6, 5], 2, [6]),           # "5 6" seen; the row ends with 5
    ([5, 6, 5, 7, 5], 2, [6, 7]),
    ([1, 2, 3, 1, 2], 3, [3]),
    ([1, 2, 3, 1, 2], 4, []),
    ([4, 4], 1, [4]),              # n = 1: every token seen
    ([9], 3, []),                  # too short to end an n-gram
])
def test_banned_ngram_tokens(row, n, banned):
    assert banned_ngram_tokens(row, n) == banned


def test_controls_match_hugging_face_logits_processors():
    transformers = pytest.importorskip("transformers", reason="the hf extra holds transformers")
    generator = torch.Generator().manual_seed(0)
    history = torch.randint(6, (4, 9), generator=generator)  # a small vocabulary repeats n-grams often
    logits = torch.randn(4, 11, generator=generator) * 3
    penalty = transformers.RepetitionPenaltyLogitsProcessor(1.7)
    ngrams = transformers.NoRepeatNGramLogitsProcessor(2)
    expected = ngrams(history, penalty(history, logits.clone()))
    got = apply_controls(logits, history, SamplingSettings.plain(repetition_penalty=1.7, no_repeat_ngram_size=2))
    assert torch.equal(got.isinf(), expected.isinf()) and expected.isinf().any()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bad, message", [
    (dict(guidance=-0.5), "guidance"), (dict(guidance=float("nan")), "guidance"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size"),
    (dict(guidance_tokens=-1), "guidance_tokens"), (dict(guidance_tokens=2.5), "guidance_tokens"),
    (dict(guidance_tokens=True), "guidance_tokens"), (dict(guidance_after=-0.5), "guidance_after"),
    (dict(guidance_after=float("nan")), "guidance_after")])
def test_bad_controls_are_value_errors_naming_the_value(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings.plain(**bad)


def spread_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=3, n_embd=36, block_size=20, vocab_size=53, bias=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.35)
    return model


CONTROLS = {
    "guidance 2": dict(guidance=2.0),
    "guidance 0": dict(guidance=0.0),
    "penalty": dict(repetition_penalty=1.5),
    "ngram 2": dict(no_repeat_ngram_size=2),
    "all": dict(guidance=1.5, repetition_penalty=1.3, no_repeat_ngram_size=3),
    "guidance for 5 tokens": dict(guidance=3.0, guidance_tokens=5, guidance_after=1.0),
    "all, guidance for 2 tokens": dict(guidance=2.5, guidance_tokens=2, guidance_after=1.5, repetition_penalty=1.3,
                                       no_repeat_ngram_size=3),
}


@requires_cached
@pytest.mark.parametrize("controls", CONTROLS)
def test_greedy_decoding_under_controls_is_token_identical_across_samplers(controls):
    model = spread_model()
    generator = torch.Generator().manual_seed(3)
    idx = torch.randint(50, (3, 4), generator=generator)
    guidance_idx = idx.clone()
    guidance_idx[:, 1] = torch.tensor([50, 51, 52])  # the second conditioning: another token at position 1
    options = dict(settings=SamplingSettings.plain(temperature=0, **CONTROLS[controls]), guidance_idx=guidance_idx)
    new_tokens = 24  # past the block of 20: the window slides
    expected = generate(model, idx, new_tokens, sampler="reference", **options)
    assert not torch.equal(expected, generate(model, idx, new_tokens, GREEDY, sampler="reference")), \
        "the controls should change the greedy tokens here"
    for name in ("kvcache", "cached"):
        assert torch.equal(generate(model, idx, new_tokens, sampler=name, **options), expected), name


@requires_cached
@pytest.mark.parametrize("name", ["reference", "kvcache", "cached"])
def test_each_sampler_switches_the_guidance_scale_after_guidance_tokens(name):
    """Guidance 0 (the second conditioning alone) for 3 tokens, then 2.5: the first 3 greedy tokens are
    those of guidance 0 throughout, and the switch happens at the 4th token in every sampler."""
    model = spread_model()
    idx = torch.randint(50, (3, 4), generator=torch.Generator().manual_seed(3))
    guidance_idx = idx.clone()
    guidance_idx[:, 1] = torch.tensor([50, 51, 52])
    schedule = GREEDY.replace(guidance=0.0, guidance_tokens=3, guidance_after=2.5)
    switched = generate(model, idx, 8, schedule, sampler=name, guidance_idx=guidance_idx)
    second_alone = generate(model, idx, 8, GREEDY.replace(guidance=0.0), sampler=name, guidance_idx=guidance_idx)
    assert torch.equal(switched[:, :7], second_alone[:, :7])
    assert not torch.equal(switched[:, 7], second_alone[:, 7]), "guidance 2.5 should change the 4th token here"
    assert torch.equal(switched, generate(model, idx, 8, schedule, sampler="reference", guidance_idx=guidance_idx))


@requires_cached
def test_the_compiled_sampler_checks_the_guidance_schedule_itself():
    sampler = packed_sampler(spread_model())
    idx = torch.zeros((2, 3), dtype=torch.long)
    with pytest.raises(ValueError, match="guidance_tokens"):
        sampler.generate(idx, 3, guidance=2.0, guidance_idx=idx, guidance_tokens=-1)
    with pytest.raises(ValueError, match="guidance_after"):
        sampler.generate(idx, 3, guidance=2.0, guidance_idx=idx, guidance_tokens=1, guidance_after=float("inf"))
    with pytest.raises(ValueError, match="guidance_idx"):
        sampler.generate(idx, 3, guidance_tokens=1, guidance_after=2.0)


@requires_cached
def test_the_compiled_sampler_guided_draws_follow_the_reference_distribution():
    """Guided sampling at temperature 1: the first token's frequencies against the guided softmax."""
    model = spread_model(1)
    idx = torch.full((4000, 3), 7)
    guidance_idx = idx.clone()
    guidance_idx[:, 1] = 9
    out = packed_sampler(model).generate(idx, 1, temperature=1.0, seed=5, guidance=2.5, guidance_idx=guidance_idx)
    with torch.no_grad():
        logits = model(torch.cat([idx[:1], guidance_idx[:1]]))[0][:, -1]
    probs = guide(logits, 2.5).softmax(-1)[0]
    counts = torch.bincount(out[:, -1], minlength=probs.numel()).float()
    top = probs.argsort(descending=True)[:5]
    observed, expected = counts[top] / len(out), probs[top]
    tolerance = 4 * (expected * (1 - expected) / len(out)).sqrt() + 1e-3  # 4 standard errors
    assert ((observed - expected).abs() <= tolerance).all(), (observed, expected)


@requires_cached
@pytest.mark.parametrize("name", ["reference", "kvcache", "cached"])
def test_guidance_needs_the_second_prompts(name):
    model = spread_model()
    idx = torch.zeros((2, 3), dtype=torch.long)
    guided = SamplingSettings.plain(guidance=2.0)
    with pytest.raises(ValueError, match="guidance_idx"):
        generate(model, idx, 3, guided, sampler=name)
    with pytest.raises(ValueError, match="guidance_idx"):
        generate(model, idx, 3, guided, sampler=name, guidance_idx=torch.zeros((2, 4), dtype=torch.long))
    with pytest.raises(ValueError, match="guidance_idx"):  # guided from the 3rd token on
        generate(model, idx, 3, SamplingSettings.plain(guidance_tokens=2, guidance_after=2.0), sampler=name)
    # Out-of-range settings are refused when they are made, before any sampler runs.
    with pytest.raises(ValueError, match="guidance"):
        SamplingSettings.plain(guidance=-1.0)
    with pytest.raises(ValueError, match="guidance_after"):
        SamplingSettings.plain(guidance_tokens=2, guidance_after=-1.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingSettings.plain(repetition_penalty=0.0)
