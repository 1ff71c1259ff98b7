"""The compiled sampler's bf16 and int8 weights: each kernel against an fp32 model holding the same
rounded weights (any row length, each architecture option), and the formats against fp32 on a trained model
(logits, validation NLL, greedy agreement)."""
import dataclasses

import pytest
import torch

from mingpt import GPT, GPTConfig
from mingpt.sample import compiled, engine
from mingpt.data.tokens import TokenData
from mingpt.ops.extension import require_extension
from mingpt.sample.engine import generate
from mingpt.sample.compiled import packed_sampler
from mingpt.tokenizer import PAD
from mingpt.sample.settings import SamplingSettings, WEIGHT_FORMATS
from test_model_options import OPTION_IDS, OPTIONS
from test_running_rows import running_rows_logits
from test_sampler import reference_step_logits, spread_options_model

GREEDY = SamplingSettings.plain(temperature=0)

pytestmark = pytest.mark.skipif(compiled.cached_sampler_unavailable_reason() is not None,
                                reason=f"{compiled.cached_sampler_unavailable_reason()}")

# (format, portable): every kernel a build can have; where the CPU lacks the bf16 or VNNI dot
# products, the non-portable variant is the portable kernel again.
KERNELS = [("bf16", True), ("bf16", False), ("int8", True), ("int8", False)]


def kernel_sampler(model, weights, portable):
    return require_extension().KVSampler(model.state_dict(), dataclasses.asdict(model.config),
                                         weight_format=weights, portable=portable)


def rounded_like_format(w, weights):
    """The values a format holds for the matrix w: bf16 rounded to nearest even, or int8 per row
    (round(w * 127 / max |row|), times max / 127) as the sampler packs them."""
    if weights == "bf16":
        return w.to(torch.bfloat16).float()
    top = w.abs().amax(dim=1, keepdim=True)
    inverse = torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    return torch.round(w * inverse) * (top / 127.0)


def packed_in_format(name, config):
    """Whether the sampler holds the state dict's tensor `name` in the weight format: the matrices, the token
    embedding only as the tied head (the position, bigram and untied token embeddings stay float32)."""
    matrices = ("c_attn.weight", "c_proj.weight", "c_fc.weight", "lm_head.weight")
    return name.endswith(matrices) or (name == "transformer.wte.weight" and config.tie_head)


def model_with_rounded_weights(model, weights):
    """A copy of the model whose matrices (the tied embedding included) hold the format's values."""
    rounded = GPT(model.config).eval()
    state = {name: rounded_like_format(p, weights) if packed_in_format(name, model.config) else p
             for name, p in model.state_dict().items()}
    rounded.load_state_dict(state)
    return rounded


def spread_model(config, seed=0):
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.35)
    return model


# Rows of 252 (the seed preset's width), and of 42 and 168: not multiples of the 2 or 4 values a
# bf16 or int8 k-step holds. Batch 13 runs a full tile of 12 rows and a tile of one.
ROW_CONFIGS = [GPTConfig(n_layer=1, n_head=12, n_embd=252, block_size=16, vocab_size=70),
               GPTConfig(n_layer=2, n_head=3, n_embd=42, block_size=16, vocab_size=45, bias=False)]


@pytest.mark.parametrize("config", ROW_CONFIGS, ids=["n_embd252", "n_embd42"])
@pytest.mark.parametrize("weights, portable", KERNELS)
def test_each_kernel_computes_the_fp32_model_of_its_rounded_weights(config, weights, portable):
    """The portable kernels decode the weights to fp32 and multiply fp32 rows: the fp32 sampler's logits
    on the rounded weights, up to summation order. The dot-product kernels also round the rows (bf16)
    or quantise them (int8, per group of 64): within the error that adds."""
    model = spread_model(config)
    sampler = kernel_sampler(model, weights, portable)
    torch.manual_seed(1)
    idx = torch.randint(config.vocab_size, (13, 3))
    out, logits = sampler.generate(idx, 8, temperature=0, num_threads=2, record_logits=True)
    exact = packed_sampler(model_with_rounded_weights(model, weights))
    expected = exact.generate(out[:, :-1], 1, temperature=0, num_threads=1, record_logits=True)[1][:, 0]
    assert_within_kernel_error(sampler, portable, logits[:, -1], expected)
    assert sampler.weight_format == weights and sampler.kernel.startswith(weights)
    assert ("portable" in sampler.kernel) == (portable or not dot_product_kernel(sampler, portable))


def dot_product_kernel(sampler, portable):
    return not portable and sampler.kernel.endswith(("avx512_bf16", "avx512_vnni"))


def assert_within_kernel_error(sampler, portable, logits, expected, dot_product_share=0.05):
    """logits within summation order (the portable kernels) or the rounding of the rows (the dot-product ones:
    dot_product_share of the largest logit) of `expected`, the fp32 logits of the rounded weights."""
    share = dot_product_share if dot_product_kernel(sampler, portable) else 2e-4
    tolerance = share * float(expected.abs().max())
    assert float((logits - expected).abs().max()) <= tolerance, sampler.kernel


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("weights, portable", KERNELS)
def test_each_kernel_computes_each_option_as_the_forward_of_its_rounded_weights(options, weights, portable):
    """Every step of a generation past the block (the window slides), and RunningRows at positions of their own,
    against the no-cache forward of the model holding the format's values. Over these ~100 rows of logits the
    int8 dot products, which quantise the rows, stray up to ~6 % of the largest logit (measured: 0.54 of 8.9)."""
    model = spread_options_model(options)
    rounded = model_with_rounded_weights(model, weights)
    sampler = kernel_sampler(model, weights, portable)
    idx = torch.randint(model.config.vocab_size, (3, 4), generator=torch.Generator().manual_seed(1))
    out, logits = sampler.generate(idx, model.config.block_size + 2, temperature=0, num_threads=2,
                                   record_logits=True)
    assert_within_kernel_error(sampler, portable, logits, reference_step_logits(rounded, out, 4), 0.1)
    assert_within_kernel_error(sampler, portable, *running_rows_logits(sampler.running_rows(5, 2), rounded), 0.1)


def test_formats_hold_fewer_bytes_and_fp32_stays_exact():
    model = spread_model(ROW_CONFIGS[0])
    streamed = {w: packed_sampler(model, w).streamed_bytes for w in WEIGHT_FORMATS}
    assert streamed["bf16"] < 0.51 * streamed["fp32"] and streamed["int8"] < 0.27 * streamed["fp32"]
    idx = torch.randint(model.config.vocab_size, (2, 4))
    assert torch.equal(packed_sampler(model, "fp32").generate(idx, 6, temperature=0, num_threads=2),
                       engine.reference_generate(model, idx, 6, GREEDY))
    assert packed_sampler(model, "int8") is packed_sampler(model, "int8")
    assert packed_sampler(model, "int8") is not packed_sampler(model, "bf16")


def test_weight_format_is_checked_and_runs_in_the_compiled_sampler_only():
    model = spread_model(ROW_CONFIGS[1])
    idx = torch.zeros((1, 2), dtype=torch.long)
    with pytest.raises(ValueError, match="weight format"):
        generate(model, idx, 3, SamplingSettings.plain(weights="int4"))
    with pytest.raises(ValueError, match="compiled CPU sampler only"):
        generate(model, idx, 3, SamplingSettings.plain(weights="bf16"), sampler="reference")
    with pytest.raises(ValueError, match="weight_format"):
        kernel_sampler(model, "fp16", False)


@pytest.fixture(scope="module")
def trained(review_data_dir):
    """A small model trained on the synthetic reviews (its validation loss falls from ~4 to ~1), and
    the data."""
    data = TokenData(review_data_dir)
    config = GPTConfig(n_layer=2, n_head=3, n_embd=42, block_size=32, vocab_size=data.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = GPT(config)
    [optimizer] = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        x, y = data.get_batch("train", 32, config.block_size, generator)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), data


TRAIN_STEPS = 300


def validation_rows(data):
    """Inputs and targets of every validation review (-1 where the row is padding)."""
    rows = torch.from_numpy(data.splits["val"].astype("int64"))
    x, y = rows[:, :-1], rows[:, 1:].clone()
    y[y == data.tokenizer.token_id(PAD)] = -1
    return x, y


def sampler_logits(sampler, x):
    """(rows, positions, vocab): the sampler's next-token logits at every position of x, each a
    prefill of x's prefix."""
    return torch.stack([sampler.generate(x[:, :t + 1], 1, temperature=0, num_threads=2, record_logits=True)[1][:, 0]
                        for t in range(x.shape[1])], 1)


def nll(logits, y):
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1))


# Measured on the trained model (max |logit diff| against the fp32 forward, NLL delta, greedy agreement
# over 40 prompts of 24 tokens), portable and avx512 kernels: bf16 0.025 and 0.044, +0.0001 nats, 100 %;
# int8 0.075 and 0.125, -0.0003 nats, 80 %. The bounds leave room for other compilers and CPUs.
BOUNDS = {"bf16": dict(logit=0.15, nll=0.005, greedy=0.9), "int8": dict(logit=0.4, nll=0.02, greedy=0.65)}


@pytest.mark.parametrize("weights, portable", KERNELS)
def test_formats_track_the_fp32_forward_of_a_trained_model(trained, weights, portable):
    model, data = trained
    x, y = validation_rows(data)
    with torch.no_grad():
        expected = model(x)[0]
    fp32_nll = nll(expected, y)
    assert abs(nll(sampler_logits(packed_sampler(model), x), y) - fp32_nll) < 1e-5
    assert fp32_nll < 1.5, "the model did not train"
    logits = sampler_logits(kernel_sampler(model, weights, portable), x)
    valid = (y >= 0).unsqueeze(-1)
    max_diff = float(((logits - expected) * valid).abs().max())
    delta = nll(logits, y) - fp32_nll
    bounds = BOUNDS[weights]
    assert max_diff <= bounds["logit"] and abs(delta) <= bounds["nll"], (max_diff, delta)
    prompts, new = x[:, :3], 24
    greedy = packed_sampler(model).generate(prompts, new, temperature=0, num_threads=2)
    out = kernel_sampler(model, weights, portable).generate(prompts, new, temperature=0, num_threads=2)
    agree = float((out == greedy).all(dim=1).float().mean())
    assert agree >= bounds["greedy"], agree
    print(f"{weights} {'portable' if portable else 'native'}: max |logit diff| {max_diff:.4f}, "
          f"NLL {fp32_nll:.4f} {delta:+.5f}, greedy agreement {agree:.0%} of {len(prompts)} prompts")


def test_sample_cli_writes_with_each_weight_format(serve_ckpt, capsys):
    from mingpt.sample.__main__ import main
    args = ["--ckpt", serve_ckpt, "--start", "好看", "--sentiment", "pos", "--num_samples", "3", "--max_new_tokens",
            "12", "--seed", "1", "--verbose"]
    for weights in WEIGHT_FORMATS:
        assert main(args + ["--weights", weights]) == 0
        captured = capsys.readouterr()
        assert f"sampler: cached, {weights} weights" in captured.err
        assert len(captured.out.splitlines()) == 3 and all("好看" in line for line in captured.out.splitlines())
    assert main(args + ["--weights", "int8", "--sampler", "reference"]) == 2
    assert "compiled CPU sampler only" in capsys.readouterr().err
