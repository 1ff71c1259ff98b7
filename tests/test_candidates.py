"""Best of n candidates: the conditioning margin against log-probabilities summed by hand, the kept draw
is the best of the draws the sampler makes, every sampler keeps the same one, and a callback sees the
kept rows."""
import pytest
import torch

from mingpt import GPT, GPTConfig
from mingpt.sample import compiled
from mingpt.sample.candidates import best_rows, conditioning_margin, tokens_to_score
from mingpt.sample.engine import generate
from mingpt.sample.settings import SamplingSettings, SettingError

EOS = 0
SAMPLERS = ["reference", "kvcache"] + (["cached"] if compiled.cached_sampler_unavailable_reason() is None else [])


def small_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=3, n_embd=21 * 3, block_size=24, vocab_size=29, bias=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def prompts(batch: int = 3, length: int = 4):
    idx = torch.randint(1, 27, (batch, length), generator=torch.Generator().manual_seed(1))
    second = idx.clone()
    second[:, 1] = 28  # the second conditioning: another token at position 1
    return idx, second


def summed_log_prob(model, prompt, new):
    """log p(new | prompt), token by token from the model's full-sequence logits, stopping after the first EOS."""
    with torch.no_grad():
        logits = model(torch.cat([prompt, new]).unsqueeze(0))[0][0]
    total = 0.0
    for i, token in enumerate(new.tolist()):
        total += float(logits[len(prompt) + i - 1].log_softmax(-1)[token])
        if token == EOS:
            break
    return total


def test_the_margin_is_the_log_likelihood_ratio_of_the_two_prompts_up_to_the_end_token():
    model = small_model()
    idx, second = prompts()
    new = torch.tensor([[5, 6, 7, 8, 9], [5, EOS, 7, 8, 9], [EOS, EOS, EOS, EOS, EOS]])
    margins = conditioning_margin(model, torch.cat([idx, new], 1), second, eos_id=EOS)
    for row in range(3):
        expected = summed_log_prob(model, idx[row], new[row]) - summed_log_prob(model, second[row], new[row])
        assert margins[row].item() == pytest.approx(expected, abs=1e-4)
    assert tokens_to_score(new, EOS).sum(1).tolist() == [5, 2, 1]


def test_the_margin_counts_only_the_new_tokens_that_fit_the_block():
    model = small_model()
    idx, second = prompts(batch=2)
    new = torch.randint(1, 27, (2, 30), generator=torch.Generator().manual_seed(2))  # 4 + 30 > block of 24
    margins = conditioning_margin(model, torch.cat([idx, new], 1), second, eos_id=EOS)
    assert torch.allclose(margins, conditioning_margin(model, torch.cat([idx, new[:, :20]], 1), second, eos_id=EOS))


def test_best_rows_takes_the_largest_margin_of_each_group():
    margins = torch.tensor([0.1, 2.0, -1.0, -3.0, -0.5, -2.0])
    assert best_rows(margins, 3).tolist() == [1, 4]
    assert best_rows(margins, 1).tolist() == list(range(6))


@pytest.mark.parametrize("name", SAMPLERS)
def test_candidates_keep_each_rows_best_draw_of_the_draws_the_sampler_makes(name):
    model = small_model()
    idx, second = prompts()
    settings = SamplingSettings.plain(top_p=0.9)
    kept = generate(model, idx, 12, settings.replace(candidates=4), eos_id=EOS, seed=3, sampler=name,
                    guidance_idx=second)
    draws = generate(model, idx.repeat_interleave(4, 0), 12, settings, eos_id=EOS, seed=3, sampler=name,
                     guidance_idx=second.repeat_interleave(4, 0))
    margins = conditioning_margin(model, draws, second.repeat_interleave(4, 0), eos_id=EOS).view(3, 4)
    assert len({tuple(row) for row in draws.tolist()}) > 3, "the draws of a row should differ here"
    for row in range(3):
        best = int(margins[row].argmax())
        assert kept[row].tolist() == draws[row * 4 + best].tolist()
        assert margins[row, best] == margins[row].max()


@pytest.mark.parametrize("name", SAMPLERS[1:])
def test_every_sampler_keeps_the_reference_samplers_choice_when_greedy_draws_agree(name):
    model = small_model()
    idx, second = prompts()
    settings = SamplingSettings.plain(temperature=0, guidance=2.0, candidates=2)
    expected = generate(model, idx, 10, settings, eos_id=EOS, sampler="reference", guidance_idx=second)
    assert torch.equal(generate(model, idx, 10, settings, eos_id=EOS, sampler=name, guidance_idx=second), expected)


def test_a_callback_receives_the_kept_rows_and_may_retire_one():
    model = small_model()
    idx, second = prompts()
    settings = SamplingSettings.plain(candidates=3)
    expected = generate(model, idx, 8, settings, eos_id=EOS, seed=4, sampler="kvcache", guidance_idx=second)
    columns = []

    def callback(column):
        columns.append(column)
        return [1] if len(columns) == 2 else None

    kept = generate(model, idx, 8, settings, eos_id=EOS, seed=4, sampler="kvcache", guidance_idx=second,
                    callback=callback)
    assert columns[:2] == [expected[:, 4].tolist(), expected[:, 5].tolist()]
    assert torch.equal(kept[[0, 2]], expected[[0, 2], :kept.shape[1]])
    assert kept[1, :6].tolist() == expected[1, :6].tolist() and set(kept[1, 6:].tolist()) <= {EOS}


def test_candidates_need_the_second_prompts_and_a_count_in_range():
    model = small_model()
    idx, _ = prompts()
    with pytest.raises(ValueError, match="guidance_idx"):
        generate(model, idx, 3, SamplingSettings.plain(candidates=2))
    for bad in (0, 65, True, 2.0):
        with pytest.raises(SettingError, match="candidates"):
            SamplingSettings.plain(candidates=bad)
