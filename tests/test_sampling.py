import pytest
import torch

from mingpt import GPT, GPTConfig
from mingpt.sample import engine
from mingpt.sample.engine import generate, next_token_probs, nucleus, pick_next
from mingpt.sample.settings import SamplingSettings
from test_sampler import chi2_quantile

GREEDY = SamplingSettings.plain(temperature=0)


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=20)).eval()


def test_seeded_sampling_is_reproducible():
    model, idx = tiny_model(), torch.zeros((3, 2), dtype=torch.long)
    a = generate(model, idx, 12, SamplingSettings.plain(temperature=1.0, top_k=5), seed=7, sampler="reference")
    b = generate(model, idx, 12, SamplingSettings.plain(temperature=1.0, top_k=5), seed=7, sampler="reference")
    c = generate(model, idx, 12, SamplingSettings.plain(temperature=1.0, top_k=5), seed=8, sampler="reference")
    assert a.shape == (3, 14) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :2], idx)


def test_greedy_past_the_block_uses_the_last_window():
    model = tiny_model()
    out = generate(model, torch.tensor([[1, 2, 3]]), 10, GREEDY, sampler="reference")
    logits, _ = model(out[:, -1 - 8:-1])
    assert out[0, -1] == logits[0, -1].argmax()


def test_eos_stops_and_pads():
    model = tiny_model()
    greedy = generate(model, torch.tensor([[1]]), 1, GREEDY, sampler="reference")
    eos = int(greedy[0, 1])
    out = generate(model, torch.tensor([[1], [1]]), 6, GREEDY, eos_id=eos, sampler="reference")
    assert out.shape == (2, 2) and (out[:, 1] == eos).all()


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(next_token_probs(logits, 1.0, top_k=2), torch.tensor([[0.625, 0.375, 0, 0]]))
    # the smallest set whose mass reaches 0.8 is {0.5, 0.3}
    assert torch.allclose(next_token_probs(logits, 1.0, top_p=0.8), torch.tensor([[0.625, 0.375, 0, 0]]))
    assert torch.allclose(next_token_probs(logits, 1.0, top_p=0.81), torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    assert torch.allclose(next_token_probs(logits, 1.0, top_p=1.0), torch.exp(logits))
    # min-p: keep tokens at least min_p times the likeliest one's probability (0.5 here)
    assert torch.allclose(next_token_probs(logits, 1.0, min_p=0.5), torch.tensor([[0.625, 0.375, 0, 0]]))
    assert torch.allclose(next_token_probs(logits, 1.0, min_p=0.2), torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    assert torch.allclose(next_token_probs(logits, 1.0, top_p=0.8, min_p=0.7), torch.tensor([[1.0, 0, 0, 0]]))


@pytest.mark.parametrize("settings, message", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(min_p=1.5), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_settings_raise(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings.plain(**settings)


def test_unknown_sampler_raises():
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(tiny_model(), torch.zeros((1, 1), dtype=torch.long), 3, SamplingSettings.plain(), sampler="beam")


def test_bad_prompts_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="at least one"):
        generate(model, torch.zeros((0, 1), dtype=torch.long), 3, SamplingSettings.plain())
    with pytest.raises(ValueError, match="outside"):
        generate(model, torch.full((1, 1), 20), 3, SamplingSettings.plain())
    with pytest.raises(ValueError, match="LongTensor"):
        generate(model, torch.zeros((1, 1)), 3, SamplingSettings.plain())


def nucleus_by_sorting(logits, top_p):
    """The nucleus by its definition: sort the whole row, keep a token while the mass before it is below top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    keep_sorted = (probs.cumsum(dim=-1) - probs) < top_p
    return keep_sorted.scatter(-1, order, keep_sorted)


@pytest.mark.parametrize("candidates", [1024, 8])
def test_the_nucleus_among_the_likeliest_tokens_is_the_whole_rows(candidates, monkeypatch):
    """Rows decided among the likeliest tokens, and rows too flat for them (sorted whole), in one batch."""
    monkeypatch.setattr(engine, "TOP_P_CANDIDATES", candidates)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3000, generator=generator) * torch.linspace(0.5, 12, 64)[:, None]  # flat to peaked
    top = logits.softmax(-1).topk(candidates).values.sum(-1)
    for top_p in (0.5, 0.9, 0.95):
        assert torch.equal(nucleus(logits, top_p), nucleus_by_sorting(logits, top_p)), top_p
    assert (top < 0.95).any() and (top >= 0.95).any(), "the case should take both paths"


def test_pick_next_draws_follow_next_token_probs():
    """20,000 draws of one row against next_token_probs, by a chi-square test (upper tail 1e-6, a fixed seed):
    the inverse-CDF draw never picks a token of probability 0 and follows the others."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)) * 2
    settings = SamplingSettings.plain(temperature=0.8, top_p=0.9)
    probs = next_token_probs(logits, 0.8, None, 0.9)[0].double()
    draws = pick_next(logits.repeat(20_000, 1), settings, torch.Generator().manual_seed(2))[:, 0]
    counts = torch.bincount(draws, minlength=50).double()
    assert counts[probs == 0].sum() == 0 and (probs == 0).any()
    expected = probs * len(draws)
    big = expected >= 5
    observed_cells = torch.cat([counts[big], counts[~big & (probs > 0)].sum().view(1)])
    expected_cells = torch.cat([expected[big], expected[~big & (probs > 0)].sum().view(1)])
    keep = expected_cells > 0
    chi2 = float(((observed_cells - expected_cells)[keep] ** 2 / expected_cells[keep]).sum())
    df = int(keep.sum()) - 1
    assert df >= 5 and chi2 < chi2_quantile(df, 4.75), (chi2, df)
