"""GPTConfig's architecture options after GPT-2: what each computes, that the one forward still serves
training, prefill, decode, per-row positions and packed rows with each, that the fused backends train
them as the reference does, that the compiled sampler runs them (tests/test_sampler.py holds it to the
forward's logits) and that the GPT-2 export refuses them by name."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mingpt import GPT, GPTConfig
from mingpt.hf import HFFormatError, check_gpt2_architecture
from mingpt.ops import BackendUnavailable
from mingpt.sample.compiled import cached_sampler_unavailable_reason
from mingpt.sample.engine import resolve_sampler
from test_model import assert_cache_serves_prefill_and_decode

ALL_OPTIONS = dict(norm="rmsnorm", positions="rotary", qk_norm=True, mlp="relu2", tie_head=False, logit_softcap=15.0,
                   bigram_buckets=97)
OPTIONS = [dict(norm="rmsnorm"), dict(positions="rotary"), dict(qk_norm=True), dict(mlp="relu2"),
           dict(tie_head=False), dict(logit_softcap=15.0), dict(bigram_buckets=97), ALL_OPTIONS]
OPTION_IDS = ["rmsnorm", "rotary", "qk_norm", "relu2", "untied", "softcap", "bigram", "all"]


def options_model(backend="reference", **options):
    """A small model (head size 14, odd block) whose weights are pushed away from their init, so that the
    zero-initialised head and unit gains are exercised with values of their own."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=3, n_embd=42, block_size=17, vocab_size=50, **options), backend=backend)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_one_forward_serves_prefill_decode_and_row_positions(options, backend):
    model = options_model(backend, **options)
    idx = torch.randint(50, (3, 17))
    whole = assert_cache_serves_prefill_and_decode(model, idx)
    with torch.no_grad():  # rows at positions of their own (a running batch whose rows joined at different steps)
        rows = model.new_cache(3)
        for row, length in enumerate((4, 9, 13)):
            model(idx[row:row + 1, :length], cache=rows.rows(row, row + 1))
        positions = torch.tensor([4, 9, 13])
        step, _ = model(idx[torch.arange(3), positions][:, None], cache=rows, start=positions)
    torch.testing.assert_close(step[:, 0], whole[torch.arange(3), positions], rtol=0, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_a_packed_review_reads_as_it_does_alone(options):
    """Positions restart at each packed review (rotary ones too) and attention stays inside it."""
    model = options_model(**options)
    first, second = torch.randint(50, (1, 6)), torch.randint(50, (1, 11))
    starts = torch.tensor([[0] * 6 + [6] * 11])
    with torch.no_grad():
        packed, _ = model(torch.cat([first, second], dim=1), starts=starts)
        alone, _ = model(second)
    torch.testing.assert_close(packed[:, 6:], alone, rtol=0, atol=1e-5)


def test_options_compute_what_their_names_say():
    model = options_model(**ALL_OPTIONS)
    ops, block, x = model.ops, model.transformer.h[0], torch.randn(2, 5, 42)
    weight = block.ln_1.weight
    torch.testing.assert_close(block.ln_1(x, ops), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * weight)
    fc = block.mlp.c_fc
    torch.testing.assert_close(fc(x, ops), F.linear(x, fc.weight, fc.bias).clamp_min(0) ** 2)
    assert model.lm_head.weight is not model.transformer.wte.weight and "wpe" not in model.transformer
    assert torch.count_nonzero(GPT(model.config).lm_head.weight) == 0  # an untied head starts uniform
    logits, _ = model(torch.randint(50, (2, 17)))
    assert logits.abs().max() < 15.0


def test_rotary_positions_are_relative():
    """A query at m against a key at n scores by m - n alone, and position 0 is no rotation."""
    model = options_model(positions="rotary")
    q, k = torch.randn(1, 1, 1, 14), torch.randn(1, 1, 1, 14)

    def at(x, p):  # x as the query of a one-head qkv, turned to position p
        qkv = torch.cat([x.view(1, 1, 14), torch.zeros(1, 1, 28)], dim=-1)
        return model.ops.rotary(qkv, *model.rotary(torch.tensor([[p]])), 1)[..., :14].view(x.shape)

    torch.testing.assert_close(at(q, 0), q)
    scores = [float((at(q, m) * at(k, m - 3)).sum()) for m in (3, 7, 16)]
    assert max(scores) - min(scores) < 1e-5
    assert abs(float((at(q, 5) * at(k, 0)).sum()) - scores[0]) > 1e-3  # another distance, another score
    torch.testing.assert_close(at(q, 11).norm(), q.norm())


def test_qk_norm_gives_each_head_unit_rms_times_its_gain():
    model = options_model(qk_norm=True)
    attn, x = model.transformer.h[0].attn, torch.randn(2, 5, 42)
    qkv = attn.queries_and_keys(attn.c_attn(x), model.ops, None)
    q, k, v = qkv.view(2, 5, 3, 3, 14).unbind(2)
    for normalised, norm in ((q, attn.q_norm), (k, attn.k_norm)):
        rms = (normalised / norm.weight).pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    torch.testing.assert_close(v, attn.c_attn(x).view(2, 5, 3, 3, 14)[:, :, 2])


def test_bigram_embedding_adds_the_row_of_each_pair():
    model = options_model(bigram_buckets=97)
    idx = torch.tensor([[5, 7, 7, 40], [1, 2, 3, 4]])
    starts = torch.tensor([[0, 0, 2, 2], [0, 0, 0, 0]])  # row 0 packs two reviews of two tokens
    previous = model.previous_tokens(idx, None, 0, model.positions(idx, 0, starts))
    assert previous.tolist() == [[-1, 5, -1, 7], [-1, 1, 2, 3]]
    rows = model.bigram(previous, idx)
    torch.testing.assert_close(rows[0, 1], model.bigram.weight[(5 * 1_000_003 + 7) % 97])
    torch.testing.assert_close(rows[0, 2], model.bigram.weight[97])  # no previous token in its review
    assert torch.count_nonzero(GPT(model.config).bigram.weight) == 0


def test_moved_and_kept_cache_rows_keep_their_tokens():
    """The server compacts its batch (move_rows) and the samplers drop finished rows (keep_rows): the
    bigram's previous token moves with each row's keys and values."""
    model = options_model(**ALL_OPTIONS)
    idx = torch.randint(50, (3, 9))
    with torch.no_grad():
        whole, _ = model(idx)
        cache = model.new_cache(3)
        model(idx[:, :8], cache=cache)
        cache.move_rows([2], [0])
        moved, _ = model(idx[[2, 1], 8:], cache=cache.rows(0, 2), start=8)
        cache.keep_rows(torch.tensor([1, 0]))
        kept, _ = model(idx[[1, 2], 8:], cache=cache, start=torch.tensor([8, 8]))
    torch.testing.assert_close(moved[:, 0], whole[[2, 1], 8], rtol=0, atol=1e-5)
    torch.testing.assert_close(kept[:, 0], whole[[1, 2], 8], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_backends_compute_every_option_as_the_reference(backend):
    """The loss and every parameter's gradient of a model with every option on, in fp32."""
    reference = options_model("reference", **ALL_OPTIONS).train()
    fused = options_model(backend, **ALL_OPTIONS).train()
    try:
        fused.ops
    except BackendUnavailable as e:
        pytest.skip(str(e))
    idx, targets = torch.randint(50, (3, 17)), torch.randint(50, (3, 17))
    starts = torch.tensor([[0] * 8 + [8] * 9] * 3)
    losses = []
    for model in (reference, fused):
        _, loss = model(idx, targets, starts=starts)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-5 * max(1.0, losses[0])
    for (name, p), q in zip(reference.named_parameters(), fused.parameters()):
        scale = p.grad.abs().max().item()
        assert (q.grad - p.grad).abs().max().item() <= 1e-5 * scale + 1e-9, name


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_compiled_sampler_runs_options_and_gpt2_export_refuses_them_by_name(options):
    """The compiled sampler computes every option (tests/test_sampler.py holds it to the forward's logits)."""
    model = options_model(**options)
    name = next(iter(options)) if len(options) == 1 else "norm"
    if cached_sampler_unavailable_reason() is None:  # a build with the compiled sampler
        from mingpt.sample.compiled import packed_sampler
        assert cached_sampler_unavailable_reason(model) is None and resolve_sampler("auto", model) == "cached"
        assert packed_sampler(model).generate(torch.zeros((2, 3), dtype=torch.long), 4, temperature=0).shape == (2, 7)
    with pytest.raises(HFFormatError, match=name):
        check_gpt2_architecture(model.config)
    check_gpt2_architecture(GPTConfig())


def test_config_refuses_unknown_options_by_name():
    with pytest.raises(ValueError, match="GPTConfig.norm must be one of layernorm, rmsnorm, got 'batchnorm'"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="GPTConfig.positions"):
        GPTConfig(positions="alibi")
    with pytest.raises(ValueError, match="GPTConfig.mlp"):
        GPTConfig(mlp="swiglu")
    with pytest.raises(ValueError, match="head size 7 .* must be even"):
        GPTConfig(n_embd=42, n_head=6, positions="rotary")
    with pytest.raises(ValueError, match="logit_softcap must be >= 0"):
        GPTConfig(logit_softcap=-1.0)


def test_a_model_with_every_option_trains_resumes_and_writes_reviews(review_data_dir, tmp_path):
    from conftest import tiny_cfg
    from mingpt import load
    from mingpt.train.loop import train
    from test_cli import run

    options = dict(ALL_OPTIONS, logit_softcap=30.0)
    cfg = tiny_cfg(review_data_dir, tmp_path, max_iters=30, eval_interval=15, optimizer="muon")
    cfg.model = GPTConfig(**{**vars(cfg.model), **options})
    first = train(cfg)
    cfg.max_iters, cfg.resume = 40, True
    resumed = train(cfg)
    assert resumed["iters"] == 40 and resumed["val_loss"] < first["val_loss"] < math.log(cfg.model.vocab_size)
    loaded = load(str(tmp_path))
    assert {name: getattr(loaded.model.config, name) for name in options} == options
    result = run("mingpt.sample", "--ckpt", str(tmp_path), "--start", "好看", "--num_samples", "2",
                 "--max_new_tokens", "12", "--seed", "1", "--verbose")
    assert [line.split("] ", 1)[1][:2] for line in result.stdout.splitlines()] == ["好看", "好看"]
    refused = run("mingpt.export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "hf"), check=False)
    assert refused.returncode == 2 and "positions=rotary" in refused.stderr and "Traceback" not in refused.stderr
    assert not os.path.exists(tmp_path / "hf")
