"""The KV-cached samplers against the no-cache reference: tokens, logits, seeds, distributions, and the
architecture options after GPT-2."""
import dataclasses
import math

import pytest
import torch

from mingpt import GPT, GPTConfig
from mingpt.config import ARCHITECTURE_OPTIONS
from mingpt.ops.extension import require_extension
from mingpt.sample import compiled, engine
from mingpt.sample.engine import generate, next_token_probs, reference_generate
from mingpt.sample.compiled import packed_sampler
from mingpt.sample.settings import SamplingSettings
from test_model_options import OPTION_IDS, OPTIONS

GREEDY = SamplingSettings.plain(temperature=0)

requires_cached = pytest.mark.skipif(compiled.cached_sampler_unavailable_reason() is not None,
                                     reason=f"{compiled.cached_sampler_unavailable_reason()}")

# Configs that reach every branch of the packing: n_embd not a multiple of the 16 lanes, a head
# wider than 16 (attention in two chunks), a block that is not a multiple of 16, no biases.
CONFIGS = {
    "odd": dict(n_layer=2, n_head=3, n_embd=36, block_size=20, vocab_size=53, bias=True),
    "wide_head": dict(n_layer=1, n_head=2, n_embd=42, block_size=16, vocab_size=40, bias=False),
}


def spread_model(name, seed=0):
    """A model whose logits spread over several units, so greedy paths are not decided by rounding."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**CONFIGS[name])).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.35)
    return model


# The architecture options' models: a head of 14, a block, vocabulary and width off the 16 lanes.
OPTIONS_CONFIG = dict(n_layer=2, n_head=3, n_embd=42, block_size=17, vocab_size=53)


def spread_options_model(options, seed=0):
    """A model with architecture options whose logits spread as spread_model's do, its gains and biases moved
    away from their init (the zero-initialised untied head and bigram table spread too)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**OPTIONS_CONFIG, **options)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.35)
            else:
                p.add_(0.2 * torch.randn_like(p))
    return model


def reference_step_logits(model, out, prompt_length):
    """The no-cache model's next-token logits at every step of `out`, as (batch, steps, vocab)."""
    block = model.config.block_size
    with torch.no_grad():
        return torch.stack([model(out[:, :t][:, -block:])[0][:, -1] for t in range(prompt_length, out.shape[1])], 1)


@requires_cached
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("batch, prompt_length", [(1, 1), (10, 5), (1, "block"), (10, "block")])
def test_greedy_matches_reference_tokens_and_logits(name, batch, prompt_length):
    model = spread_model(name)
    block = model.config.block_size
    prompt_length = block if prompt_length == "block" else prompt_length
    torch.manual_seed(1)
    idx = torch.randint(model.config.vocab_size, (batch, prompt_length))
    new_tokens = block + 6 - prompt_length  # past the block: the window slides for the last steps
    expected = reference_generate(model, idx, new_tokens, GREEDY)
    out, logits = packed_sampler(model).generate(idx, new_tokens, temperature=0, num_threads=2, record_logits=True)
    assert torch.equal(out, expected)
    # fp32 with another summation order: the logits (of size ~10 here) differ by ~1e-6.
    torch.testing.assert_close(logits, reference_step_logits(model, expected, prompt_length), rtol=0, atol=1e-4)
    assert torch.equal(generate(model, idx, new_tokens, GREEDY, sampler="kvcache"), expected)


@requires_cached
@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_packed_weights_follow_the_training_optimizers(kind):
    """The packed weights are repacked after an optimizer step (fused AdamW's kernel leaves the parameters'
    version counters alone: mingpt.optim.fused_adamw bumps them)."""
    model = spread_model("odd")
    idx = torch.randint(model.config.vocab_size, (3, 4), generator=torch.Generator().manual_seed(3))
    before = generate(model, idx, 10, GREEDY, sampler="cached")
    optimizers = model.configure_optimizers(0.1, 0.5, (0.9, 0.95), kind)
    _, loss = model(idx, torch.roll(idx, 1, 1))
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    expected = reference_generate(model, idx, 10, GREEDY)
    assert not torch.equal(expected, before)
    assert torch.equal(generate(model, idx, 10, GREEDY, sampler="cached"), expected)


@requires_cached
def test_eos_stops_rows_and_pads_like_the_reference():
    model = spread_model("odd")
    idx = torch.randint(model.config.vocab_size, (4, 3), generator=torch.Generator().manual_seed(2))
    free = reference_generate(model, idx, 12, GREEDY)
    eos = int(free[0, 6])  # row 0 stops at step 4; the others stop when (if) they emit it
    expected = reference_generate(model, idx, 12, GREEDY, eos_id=eos)
    for name in ("cached", "kvcache"):
        assert torch.equal(generate(model, idx, 12, GREEDY, eos_id=eos, sampler=name), expected)
    alone = generate(model, idx[:1], 12, GREEDY, eos_id=eos, sampler="cached")
    assert alone.shape[1] < 3 + 12 and alone[0, -1] == eos  # the run ends when its only row does
    assert torch.equal(alone, reference_generate(model, idx[:1], 12, GREEDY, eos_id=eos))


@requires_cached
def test_seeded_sampling_is_reproducible():
    model = spread_model("odd")
    idx = torch.zeros((3, 2), dtype=torch.long)
    options = dict(settings=SamplingSettings.plain(temperature=0.9, top_k=10, top_p=0.9), sampler="cached")
    a = generate(model, idx, 30, seed=7, **options)
    assert torch.equal(a, generate(model, idx, 30, seed=7, **options))
    assert not torch.equal(a, generate(model, idx, 30, seed=8, **options))
    assert not torch.equal(a[0], a[1])  # each row draws from its own stream
    # One thread or two: the same draws (each sample's stream does not depend on the split).
    sampler, direct = packed_sampler(model), dict(temperature=0.9, top_k=10, top_p=0.9, seed=7)
    assert torch.equal(a, sampler.generate(idx, 30, num_threads=1, **direct))
    assert torch.equal(a, sampler.generate(idx, 30, num_threads=2, **direct))
    # Without a seed, torch's global generator decides.
    torch.manual_seed(3)
    b = generate(model, idx, 30, **options)
    torch.manual_seed(3)
    assert torch.equal(b, generate(model, idx, 30, **options))


def chi2_quantile(df, z):
    """Wilson-Hilferty: the chi-square quantile whose upper tail matches the normal's at z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@requires_cached
@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [(1.0, None, None, 0.0), (0.7, 8, None, 0.0),
                                                              (1.5, None, 0.8, 0.0), (2.0, 12, 0.85, 0.0),
                                                              (1.5, None, None, 0.06), (2.0, None, 0.9, 0.1)])
def test_draws_follow_the_reference_probabilities(temperature, top_k, top_p, min_p):
    """20,000 one-token draws (10 seeds x 2,000 rows) from one prompt against next_token_probs, by a chi-square test.

    The threshold is the chi-square quantile with upper tail 1e-6 (z = 4.75): a correct sampler
    fails with probability about 1e-6 per case over seeds. The seed is fixed, so the test is
    deterministic. Tokens the reference gives probability 0 must never be drawn; no token sits
    within 1e-3 of the top-p or min-p cut, where float rounding could decide it either way.
    """
    model = spread_model("odd")
    idx = torch.tensor([[1, 2, 3]]).repeat(2_000, 1)
    settings = SamplingSettings.plain(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    draws = torch.cat([generate(model, idx, 1, settings, seed=seed, sampler="cached")[:, -1] for seed in range(10)])
    n = len(draws)
    with torch.no_grad():
        logits = model(idx[:1])[0][0, -1]
    probs = next_token_probs(logits, temperature, top_k, top_p, min_p).double()
    if top_p is not None:
        kept = next_token_probs(logits, temperature, top_k).sort(descending=True).values
        assert ((kept.cumsum(0) - kept - top_p).abs() > 1e-3).all()
    if min_p:
        relative = next_token_probs(logits, temperature, top_k, top_p) / probs.max()
        assert ((relative - min_p).abs() > 1e-3).all()
    counts = torch.bincount(draws, minlength=model.config.vocab_size).double()
    assert counts[probs == 0].sum() == 0
    expected = probs * n
    big = expected >= 5  # pool the rare tokens into one cell so the chi-square approximation holds
    observed_cells = torch.cat([counts[big], counts[~big & (probs > 0)].sum().view(1)])
    expected_cells = torch.cat([expected[big], expected[~big & (probs > 0)].sum().view(1)])
    keep = expected_cells > 0
    chi2 = float(((observed_cells - expected_cells)[keep] ** 2 / expected_cells[keep]).sum())
    df = int(keep.sum()) - 1
    assert df >= 3, "the case should spread over several tokens"
    assert chi2 < chi2_quantile(df, 4.75), (chi2, df)


@requires_cached
def test_callback_streams_every_column_and_its_errors_stop_the_run():
    model = spread_model("odd")
    idx = torch.randint(model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(4))
    for name in ("cached", "kvcache", "reference"):
        columns = []
        out = generate(model, idx, 25, GREEDY, sampler=name, callback=columns.append)
        assert torch.tensor(columns).T.tolist() == out[:, 3:].tolist()

    seen = []

    def stop_after_three(column):
        seen.append(column)
        if len(seen) == 3:
            raise KeyError("enough")

    with pytest.raises(KeyError, match="enough"):
        generate(model, idx, 25, SamplingSettings.plain(temperature=1.0), sampler="cached", callback=stop_after_three)
    assert len(seen) == 3


@requires_cached
@pytest.mark.parametrize("name", ["cached", "kvcache", "reference"])
def test_rows_a_callback_retires_are_padded_and_no_longer_computed(name):
    model = spread_model("odd")
    eos = model.config.vocab_size - 1
    idx = torch.randint(eos, (3, 4), generator=torch.Generator().manual_seed(5))
    expected = generate(model, idx, 12, GREEDY, sampler=name)
    assert (expected[:, 4:] != eos).all(), "the case needs rows that run to max_new_tokens"
    batch_sizes = []
    model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    columns = []

    def retire_row_1_after_three(column):
        columns.append(column)
        return [1] if len(columns) == 3 else None

    out = generate(model, idx, 12, GREEDY, eos_id=eos, sampler=name, callback=retire_row_1_after_three)
    assert torch.equal(out[[0, 2]], expected[[0, 2]])
    assert torch.equal(out[1, :7], expected[1, :7]) and (out[1, 7:] == eos).all()
    assert [column[1] for column in columns[3:]] == [eos] * 9
    if name != "cached":  # the Python loops call the model once a step, with the running rows only
        assert batch_sizes == [3] * 3 + [2] * 9
    else:  # the compiled sampler records no logits for a row that no longer runs
        columns.clear()
        _, logits = packed_sampler(model).generate(idx, 12, temperature=0, eos_id=eos,
                                                   callback=retire_row_1_after_three, record_logits=True)
        assert not logits[[0, 2]].isnan().any() and not logits[1, :3].isnan().any()
        assert logits[1, 3:].isnan().all()


@requires_cached
@pytest.mark.parametrize("name", ["cached", "kvcache", "reference"])
@pytest.mark.parametrize("answer, eos_id, message", [
    (["a"], 0, "row indices"), ([3], 0, "row 3|row indices"), ([True], 0, "row indices"),
    ([0], None, "no eos_id to pad")])
def test_a_callback_answer_that_names_no_row_is_a_value_error(name, answer, eos_id, message):
    model = spread_model("odd")
    with pytest.raises(ValueError, match=message):
        generate(model, torch.zeros((3, 2), dtype=torch.long), 5, SamplingSettings.plain(), sampler=name,
                 eos_id=eos_id, callback=lambda column: answer)


@requires_cached
def test_packed_weights_are_reused_until_a_parameter_changes():
    model = spread_model("odd")
    idx = torch.zeros((1, 1), dtype=torch.long)
    sampler = packed_sampler(model)
    assert packed_sampler(model) is sampler
    before = generate(model, idx, 8, GREEDY, sampler="cached")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(-1.0)
    assert packed_sampler(model) is not sampler
    after = generate(model, idx, 8, GREEDY, sampler="cached")
    assert torch.equal(after, reference_generate(model, idx, 8, GREEDY)) and not torch.equal(before, after)


@requires_cached
def test_auto_uses_the_cached_sampler_for_float32_cpu_models_only():
    model = spread_model("odd")
    assert engine.resolve_sampler("auto", model) == "cached"
    assert engine.resolve_sampler("auto", model.to(torch.bfloat16)) == "reference"
    with pytest.raises(RuntimeError, match="float32"):
        generate(model, torch.zeros((1, 1), dtype=torch.long), 2, SamplingSettings.plain(), sampler="cached")


def test_a_missing_or_stale_build_falls_back_with_the_rebuild_command(monkeypatch):
    from mingpt.ops import extension

    class StaleBuild:
        SAMPLER_VERSION = compiled.SAMPLER_VERSION - 1

    monkeypatch.setattr(extension, "_C", StaleBuild)
    reason = compiled.cached_sampler_unavailable_reason()
    assert "stale" in reason and "pip install" in reason
    with pytest.warns(RuntimeWarning, match="stale"):
        assert engine.resolve_sampler("auto") == "reference"
    model = spread_model("odd")
    with pytest.warns(RuntimeWarning):
        out = generate(model, torch.zeros((1, 1), dtype=torch.long), 4, GREEDY)
    assert torch.equal(out, reference_generate(model, torch.zeros((1, 1), dtype=torch.long), 4, GREEDY))
    with pytest.raises(RuntimeError, match="stale"):
        generate(model, torch.zeros((1, 1), dtype=torch.long), 4, SamplingSettings.plain(), sampler="cached")
    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "UNAVAILABLE_REASON", "mingpt._C could not be loaded (gone)")
    assert "could not be loaded" in compiled.cached_sampler_unavailable_reason()


@requires_cached
def test_sample_cli_uses_the_cached_sampler_by_default(review_data_dir, tmp_path, capsys):
    from mingpt.checkpoint import atomic_torch_save, make_checkpoint
    from mingpt.sample.__main__ import main
    from mingpt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(f"{review_data_dir}/tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.vocab_size))
    atomic_torch_save(make_checkpoint(model, tokenizer, {"layout": "review", "eos_token": "<eos>"}),
                      str(tmp_path / "ckpt.pt"))
    texts = {}
    for name in ("auto", "cached", "reference"):
        assert main(["--ckpt", str(tmp_path), "--start", "好看", "--sentiment", "pos", "--num_samples", "3",
                     "--max_new_tokens", "12", "--temperature", "0", "--verbose", "--sampler", name]) == 0
        captured = capsys.readouterr()
        texts[name] = captured.out
        assert f"sampler: {'cached' if name == 'auto' else name}" in captured.err
    assert texts["auto"] == texts["cached"] == texts["reference"]


@pytest.mark.cuda
def test_cuda_cached_sampler_matches_reference():
    model = spread_model("odd").cuda()
    reason = compiled.cached_sampler_unavailable_reason(model)
    if reason is not None:
        pytest.skip(reason)
    idx = torch.randint(model.config.vocab_size, (3, 4), device="cuda")
    new_tokens = model.config.block_size + 4 - 4
    expected = reference_generate(model, idx, new_tokens, GREEDY)
    assert torch.equal(generate(model, idx, new_tokens, GREEDY, sampler="cached"), expected)


@requires_cached
def test_layer_norm_eps_of_the_config_is_the_samplers():
    """A model with layer_norm_eps = 0.1 (large enough to move the logits by ~1e-1) gives the PyTorch
    forward's logits from the sampler."""
    model = GPT(GPTConfig(**CONFIGS["odd"], layer_norm_eps=0.1), backend="reference").eval()
    model.load_state_dict(spread_model("odd").state_dict())
    idx = torch.randint(model.config.vocab_size, (3, 4), generator=torch.Generator().manual_seed(5))
    new_tokens = model.config.block_size + 3 - 4
    out, logits = packed_sampler(model).generate(idx, new_tokens, temperature=0, num_threads=2, record_logits=True)
    assert torch.equal(out, reference_generate(model, idx, new_tokens, GREEDY))
    torch.testing.assert_close(logits, reference_step_logits(model, out, 4), rtol=0, atol=1e-4)
    default_eps = packed_sampler(spread_model("odd")).generate(idx, 1, temperature=0, record_logits=True)[1]
    assert (default_eps[:, 0] - logits[:, 0]).abs().max() > 1e-2, "eps should move the logits"


@requires_cached
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("batch, prompt_length", [(1, 1), (4, 6), (3, "block")])
def test_each_architecture_option_gives_the_references_tokens_and_logits(options, batch, prompt_length):
    """Every step past the block too (the window slides: rotary positions and the bigram's first token start
    again), and guided, whose second sequences keep caches and tokens of their own."""
    model = spread_options_model(options)
    block = model.config.block_size
    prompt_length = block if prompt_length == "block" else prompt_length
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(model.config.vocab_size, (batch, prompt_length), generator=generator)
    new_tokens = block + 6 - prompt_length
    expected = generate(model, idx, new_tokens, GREEDY, sampler="reference")
    out, logits = packed_sampler(model).generate(idx, new_tokens, temperature=0, num_threads=2, record_logits=True)
    assert torch.equal(out, expected)
    torch.testing.assert_close(logits, reference_step_logits(model, expected, prompt_length), rtol=0, atol=1e-4)
    guided = dict(settings=SamplingSettings.plain(temperature=0, guidance=2.0),
                  guidance_idx=torch.randint(model.config.vocab_size, idx.shape, generator=generator))
    assert torch.equal(generate(model, idx, new_tokens, sampler="cached", **guided),
                       generate(model, idx, new_tokens, sampler="reference", **guided))


def kv_sampler(model, config):
    return require_extension().KVSampler(model.state_dict(), config)


@requires_cached
@pytest.mark.parametrize("changes, error, message", [
    (dict(norm="batchnorm"), ValueError, "'norm' must be one of layernorm, rmsnorm, got 'batchnorm'"),
    (dict(positions="alibi"), ValueError, "'positions' must be one of learned, rotary"),
    (dict(n_head=6, positions="rotary"), ValueError, "'positions' rotary .* head size 7 must be even"),
    (dict(mlp="swiglu"), ValueError, "'mlp' must be one of gelu, relu2"),
    (dict(mlp=2), TypeError, "'mlp' must be a str"),
    (dict(qk_norm=1), TypeError, "'qk_norm' must be a bool"),
    (dict(tie_head="yes"), TypeError, "'tie_head' must be a bool"),
    (dict(logit_softcap=-1.0), ValueError, "'logit_softcap' must be a finite number >= 0"),
    (dict(logit_softcap=math.inf), ValueError, "'logit_softcap' must be a finite number >= 0"),
    (dict(bigram_buckets=-1), ValueError, "'bigram_buckets' must be >= 0"),
    (dict(bigram_buckets=2.5), TypeError, "'bigram_buckets' must be an int"),
])
def test_the_compiled_sampler_refuses_option_values_it_does_not_know_by_name(changes, error, message):
    model = spread_options_model({})
    with pytest.raises(error, match=message):
        kv_sampler(model, {**dataclasses.asdict(model.config), **changes})


@requires_cached
@pytest.mark.parametrize("key", ARCHITECTURE_OPTIONS)
def test_a_config_without_an_option_is_refused_by_name(key):
    model = spread_options_model({})
    config = dataclasses.asdict(model.config)
    del config[key]
    with pytest.raises(ValueError, match=f"missing '{key}'"):
        kv_sampler(model, config)


@requires_cached
@pytest.mark.parametrize("options", [dict(norm="rmsnorm"), dict(positions="rotary"), dict(qk_norm=True),
                                     dict(tie_head=False), dict(bigram_buckets=97)], ids=lambda o: next(iter(o)))
def test_weights_of_another_architecture_are_refused(options):
    """The weights must be the config's, options included: an option's weights under GPT-2's config, and GPT-2's
    under the option's (but an untied head may equal the embedding: GPT-2's weights are an untied model's too)."""
    model, gpt2 = spread_options_model(options), spread_options_model({})
    with pytest.raises(ValueError, match="weight"):
        kv_sampler(model, dataclasses.asdict(gpt2.config))
    if options != dict(tie_head=False):
        with pytest.raises(ValueError, match="weight"):
            kv_sampler(gpt2, dataclasses.asdict(model.config))
