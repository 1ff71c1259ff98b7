import pytest
import torch
import torch.nn.functional as F

from mingpt import GPT, GPTConfig
from mingpt.config import preset_config
from mingpt.ops import BackendUnavailable, get_ops, sdpa_causal_attention
from mingpt.ops.reference import reference_causal_attention


def tiny_config(**overrides):
    return GPTConfig(**{**dict(n_layer=2, n_head=3, n_embd=63, block_size=17, vocab_size=50), **overrides})


def test_seed_preset_has_the_original_parameter_count():
    config = preset_config("seed").model
    config.vocab_size = 2212
    model = GPT(config)
    assert config.n_layer == 12 and config.n_head == 12 and config.n_embd == 252 and config.block_size == 64
    C, V, L = 252, 2212, 12
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    assert model.num_params() == V * C + 64 * C + L * per_block + 2 * C == 9_757_944  # tied head counted once


@pytest.mark.parametrize("T", [1, 17])
def test_forward_shapes_and_loss(T):
    model = GPT(tiny_config())
    idx = torch.randint(50, (3, T))
    logits, loss = model(idx)
    assert logits.shape == (3, T, 50) and loss is None
    _, loss = model(idx, torch.randint(50, (3, T)))
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


def test_ignored_targets_do_not_count():
    model = GPT(tiny_config())
    idx = torch.randint(50, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -1
    _, partial = model(idx, targets)
    logits, _ = model(idx[:, :4])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), idx[:, :4].reshape(-1))
    assert torch.allclose(partial, expected, atol=1e-6)


def test_weights_are_tied_and_bias_free_option():
    model = GPT(tiny_config(bias=False))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())
    model(torch.randint(50, (1, 5)), torch.randint(50, (1, 5)))[1].backward()


def test_bad_shapes_raise_clear_errors():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="exceeds block_size 17"):
        model(torch.zeros(1, 18, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match=r"\(B, T, 3\*C\)"):
        reference_causal_attention(torch.zeros(2, 3, 10), 2)


def test_sdpa_attention_matches_reference():
    qkv = torch.randn(3, 17, 3 * 63, dtype=torch.float64)
    torch.testing.assert_close(sdpa_causal_attention(qkv, 3), reference_causal_attention(qkv, 3),
                               rtol=1e-10, atol=1e-10)


def test_backend_selection(monkeypatch):
    assert get_ops("reference").name == "reference"
    assert get_ops("auto").name in ("reference", "cpp")
    assert get_ops("sdpa").sources["causal_attention"] == "sdpa"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        get_ops("fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        get_ops("triton", "cpu")


def assert_cache_serves_prefill_and_decode(model, idx):
    """Logits from a prefill, a chunk at an offset and single-token steps through the KV cache equal
    the logits of one forward over the whole sequence (17 tokens a row); returns those logits."""
    with torch.no_grad():
        whole, _ = model(idx)
        cache = model.new_cache(idx.shape[0])
        pieces = [model(idx[:, :5], cache=cache)[0], model(idx[:, 5:9], cache=cache, start=5)[0]]
        pieces += [model(idx[:, t:t + 1], cache=cache, start=t)[0] for t in range(9, 17)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-5)
    return whole


@pytest.mark.parametrize("backend", ["reference", "sdpa", "auto"])
def test_one_forward_serves_prefill_and_decode(backend):
    assert_cache_serves_prefill_and_decode(GPT(tiny_config(), backend=backend).eval(), torch.randint(50, (3, 17)))


def test_cached_forward_checks_its_inputs():
    model = GPT(tiny_config())
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="needs the KV cache"):
        model(torch.zeros(2, 1, dtype=torch.long), start=3)
    with pytest.raises(ValueError, match="holds 2 sequences, idx 3"):
        model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"positions 16..17 exceeds block_size 17"):
        model(torch.zeros(2, 2, dtype=torch.long), cache=cache, start=16)


def test_modules_compute_what_their_names_say():
    config = tiny_config(layer_norm_eps=1e-3)
    model = GPT(config, backend="reference")
    block, x = model.transformer.h[0], torch.randn(2, 5, 63)
    ops = model.ops
    torch.testing.assert_close(block.ln_1(x, ops), F.layer_norm(x, (63,), block.ln_1.weight, block.ln_1.bias, 1e-3))
    fc = block.mlp.c_fc
    torch.testing.assert_close(fc(x, ops), F.gelu(F.linear(x, fc.weight, fc.bias), approximate="tanh"))
