"""Hugging Face GPT-2 / GPT-NeoX export and import (mingpt.hf, mingpt.export), checked against transformers offline."""
import dataclasses
import json
import os
import re
import shutil
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: these tests never reach the hub

from conftest import synthetic_reviews
from mingpt import GPT, GPTConfig, export, generate
from mingpt.sample import __main__ as sample
from mingpt.checkpoint import atomic_torch_save, load, make_checkpoint
from mingpt.config import preset_config
from mingpt.hf import HFFormatError, load_pretrained, to_hf_model, to_hf_tokenizer, tokenizer_from_json
from mingpt.tokenizer import BOS, EOS, EXTRA_BOS, NEG, POS, SPECIAL_TOKENS, BPETokenizer, CharTokenizer
from mingpt.sample.settings import SamplingSettings

GREEDY = SamplingSettings.plain(temperature=0)

LOGIT_ATOL = 1e-5  # fp32
EXTRA_TEXTS = ["好看 , 很精彩! 值得一看。", "难看?? 剧情拖沓…… 不推荐!!!", "  演技很好\n喜欢  "]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="needs the hf extra: pip install -e .[hf]")


def review_tokenizer(special_tokens=SPECIAL_TOKENS):
    return CharTokenizer.train([r.text for r in synthetic_reviews(200)] + EXTRA_TEXTS, special_tokens)


def scrambled(config: GPTConfig, seed: int) -> GPT:
    """A model whose every weight, bias and norm gain is random, so a misplaced tensor changes the logits."""
    model = GPT(config, backend="reference")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.2 * torch.randn(p.shape, generator=generator)
            p.copy_(1 + noise if re.search(r"ln_(1|2|f)\.weight", name) else noise)
    return model.eval()


def write_checkpoint(path, bias=True, seed=0, tokenizer=None, layer_norm_eps=1e-5, **options) -> str:
    tokenizer = tokenizer or review_tokenizer()
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tokenizer.vocab_size, bias=bias,
                       layer_norm_eps=layer_norm_eps, **options)
    data = {"layout": "review", "eos_token": EOS, "block_size": 64, "source": "synthetic"}
    atomic_torch_save(make_checkpoint(scrambled(config, seed), tokenizer, data, best_val_loss=1.2345, iter_num=50,
                                      train_config={"preset": "tiny"}), str(path))
    return str(path)


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


@pytest.fixture(scope="module")
def exported(transformers, tmp_path_factory):
    """(checkpoint path, exported directory) of a scrambled two-layer model."""
    root = tmp_path_factory.mktemp("hf")
    ckpt = write_checkpoint(root / "ckpt.pt")
    assert export.main(["--ckpt", ckpt, "--out", str(root / "hf")]) == 0
    return ckpt, str(root / "hf")


def test_seed_shape_is_a_gpt2_with_the_same_parameters_and_logits(transformers):
    config = preset_config("seed").model
    tokenizer = CharTokenizer([chr(0x4E00 + i) for i in range(2207)])
    config.vocab_size = tokenizer.vocab_size
    model = GPT(config, backend="reference").eval()
    hf_model = to_hf_model(model, tokenizer)
    assert isinstance(hf_model, transformers.GPT2LMHeadModel)
    assert sum(p.numel() for p in hf_model.parameters()) == model.num_params() == 9_757_944
    idx = torch.randint(config.vocab_size, (2, config.block_size))
    torch.testing.assert_close(model(idx)[0], hf_logits(hf_model, idx), rtol=0, atol=LOGIT_ATOL)


def test_export_loads_offline_in_transformers_with_the_same_logits(exported, transformers):
    ckpt, out = exported
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "mingpt.json",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    loaded = load(ckpt, backend="reference")
    model, tokenizer = loaded.model, loaded.tokenizer
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf_model.config.n_positions == 64 and hf_model.config.activation_function == "gelu_new"
    assert hf_model.config.eos_token_id == tokenizer.token_id(EOS)
    idx = torch.randint(tokenizer.vocab_size, (4, 64))
    torch.testing.assert_close(model(idx)[0], hf_logits(hf_model, idx), rtol=0, atol=LOGIT_ATOL)
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "A character-level GPT-2" in card and "preset: `tiny`" in card and "1.2345" in card and "synthetic" in card
    assert f"{model.num_params():,} parameters" in card


@pytest.mark.parametrize("sampler", ["auto", "reference"])
def test_greedy_generation_is_token_identical_for_40_tokens(exported, transformers, sampler):
    ckpt, out = exported
    loaded = load(ckpt, backend="reference")
    model, tokenizer = loaded.model, loaded.tokenizer
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    hf_model.generation_config.eos_token_id = None  # run all 40 tokens, as mingpt does without eos_id
    starts = ["", "好看", "剧情拖沓，演技很差"]
    prompts = torch.tensor([[tokenizer.token_id(BOS), tokenizer.token_id(s)] + tokenizer.encode(t.ljust(10, "。"))
                            for t, s in zip(starts, (POS, NEG, POS))])
    ours = generate(model, prompts, 40, GREEDY, sampler=sampler)
    theirs = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=40, do_sample=False)
    assert ours.shape == theirs.shape == (3, 12 + 40)
    assert torch.equal(ours, theirs)
    assert all(len(set(row.tolist())) > 5 for row in ours[:, 12:]), "continuations too repetitive to tell anything"


def test_autotokenizer_encodes_and_decodes_like_mingpt(exported, transformers):
    _, out = exported
    tokenizer = review_tokenizer()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = [r.text for r in synthetic_reviews(30, seed=1)] + EXTRA_TEXTS
    for text, sentiment in zip(texts, [POS, NEG] * len(texts)):
        ids = [tokenizer.token_id(BOS), tokenizer.token_id(sentiment)] + tokenizer.encode(text) + [tokenizer.token_id(EOS)]
        assert hf_tokenizer(f"{BOS}{sentiment}{text}{EOS}")["input_ids"] == ids
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids) == text
        assert hf_tokenizer.decode(ids) == tokenizer.decode(ids, skip_special=False) == f"{BOS}{sentiment}{text}{EOS}"
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    with pytest.raises(Exception, match="UNK"):  # an unknown character is refused, as CharTokenizer.encode does
        hf_tokenizer("好看😀")


@pytest.mark.parametrize("bias, layer_norm_eps, special_tokens", [(True, 1e-5, SPECIAL_TOKENS),
                                                                  (False, 1e-6, SPECIAL_TOKENS + (EXTRA_BOS,))])
def test_round_trip_mingpt_hf_mingpt_is_bit_identical(transformers, tmp_path, bias, layer_norm_eps, special_tokens):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", bias=bias, seed=3, layer_norm_eps=layer_norm_eps,
                            tokenizer=review_tokenizer(special_tokens))
    assert export.main(["--ckpt", ckpt, "--out", str(tmp_path / "hf")]) == 0
    loaded = load(ckpt)
    original, tokenizer = loaded.model, loaded.tokenizer
    loaded, loaded_tokenizer = load_pretrained(str(tmp_path / "hf"))[:2]
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(original.config)
    assert loaded_tokenizer.itos == tokenizer.itos and loaded_tokenizer.special_tokens == special_tokens
    before, after = original.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_bias_free_model_exports_as_exact_zero_biases(transformers, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", bias=False)
    assert export.main(["--ckpt", ckpt, "--out", str(tmp_path / "hf")]) == 0
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    biases = [p for name, p in hf_model.named_parameters() if name.endswith(".bias")]
    assert len(biases) == 2 * 6 + 1 and all(not p.any() for p in biases)
    loaded = load(ckpt, backend="reference")
    model, tokenizer = loaded.model, loaded.tokenizer
    idx = torch.randint(tokenizer.vocab_size, (2, 64))
    torch.testing.assert_close(model(idx)[0], hf_logits(hf_model, idx), rtol=0, atol=LOGIT_ATOL)


def test_directories_written_by_transformers_load(exported, transformers, tmp_path):
    _, out = exported
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(out)
    with torch.no_grad():  # as if fine-tuned in transformers
        hf_model.transformer.h[1].mlp.c_fc.weight.add_(0.1)
    hf_model.save_pretrained(tmp_path / "tuned")
    transformers.AutoTokenizer.from_pretrained(out).save_pretrained(tmp_path / "tuned")
    model, tokenizer, data = load_pretrained(str(tmp_path / "tuned"), backend="reference")
    assert tokenizer.itos == review_tokenizer().itos
    assert data == {"layout": "review", "eos_token": EOS, "source": None}  # the documented default
    idx = torch.randint(tokenizer.vocab_size, (2, 64))
    torch.testing.assert_close(model(idx)[0], hf_logits(hf_model.eval(), idx), rtol=0, atol=LOGIT_ATOL)

    fresh = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=48, n_positions=32, vocab_size=70)).eval()
    fresh.save_pretrained(tmp_path / "fresh")
    model, tokenizer = load_pretrained(str(tmp_path / "fresh"), backend="reference")[:2]
    assert tokenizer is None and model.config.block_size == 32 and model.config.dropout == 0.1
    idx = torch.randint(70, (2, 32))
    torch.testing.assert_close(model(idx)[0], hf_logits(fresh, idx), rtol=0, atol=LOGIT_ATOL)
    assert sample.main(["--ckpt", str(tmp_path / "fresh"), "--num_samples", "1"]) == 2


def test_sample_reads_an_exported_directory_like_its_checkpoint(exported, capsys):
    ckpt, out = exported
    args = ["--start", "好看", "--num_samples", "3", "--max_new_tokens", "20", "--seed", "7", "--sentiment", "auto"]
    assert sample.main(["--ckpt", ckpt, *args]) == 0
    from_checkpoint = capsys.readouterr().out
    assert sample.main(["--ckpt", out, *args]) == 0
    from_directory = capsys.readouterr().out
    assert from_directory == from_checkpoint and len(from_directory.splitlines()) == 3
    assert all(line.startswith("好看") for line in from_directory.splitlines())


def test_export_verify_reports_agreement(exported, tmp_path, capsys):
    ckpt, _ = exported
    assert export.main(["--ckpt", ckpt, "--out", str(tmp_path / "hf"), "--verify", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"max \|logit difference\| (\S+)", out).group(1)) <= LOGIT_ATOL
    assert "greedy: 8/8 prompts token-identical for 40 new tokens" in out
    assert "tokenizer: 8/8 texts encode and decode alike" in out


def edit_json(path, **changes):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**data, **changes}, f)


@pytest.mark.parametrize("change, message", [
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(activation_function="gelu"), "activation_function='gelu'"),
    (dict(n_inner=100), "n_inner=100"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    (dict(scale_attn_weights=False), "scale_attn_weights=False"),
    (dict(model_type="llama"), "model_type is 'llama'"),
    (dict(n_embd=31), r"n_embd \(31\) must be divisible by n_head"),
])
def test_gpt2_options_mingpt_cannot_compute_are_refused(exported, tmp_path, change, message):
    _, out = exported
    shutil.copytree(out, tmp_path / "hf")
    edit_json(tmp_path / "hf" / "config.json", **change)
    with pytest.raises(HFFormatError, match=message):
        load_pretrained(str(tmp_path / "hf"))


def test_untied_head_and_nonzero_biases_are_refused(exported, tmp_path):
    from safetensors.torch import load_file, save_file
    _, out = exported
    shutil.copytree(out, tmp_path / "hf")
    weights = str(tmp_path / "hf" / "model.safetensors")
    state = load_file(weights)
    save_file({**state, "lm_head.weight": state["transformer.wte.weight"] + 1}, weights)
    with pytest.raises(HFFormatError, match="lm_head.weight differs from transformer.wte.weight"):
        load_pretrained(str(tmp_path / "hf"))
    save_file(state, weights)
    edit_json(tmp_path / "hf" / "mingpt.json", bias=False)
    with pytest.raises(HFFormatError, match=r"has no biases, but transformer\.h\.0\.\S+\.bias is not zero"):
        load_pretrained(str(tmp_path / "hf"))


@pytest.mark.parametrize("special_tokens", [SPECIAL_TOKENS, SPECIAL_TOKENS + (EXTRA_BOS,)])
def test_bpe_tokenizer_exports_and_loads_back(transformers, tmp_path, special_tokens):
    tokenizer = BPETokenizer.train([r.text for r in synthetic_reviews(200)] + EXTRA_TEXTS, 300, special_tokens)
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", tokenizer=tokenizer)
    assert export.main(["--ckpt", ckpt, "--out", str(tmp_path / "hf")]) == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in [r.text for r in synthetic_reviews(20, seed=2)] + EXTRA_TEXTS + ["没见过的字😀"]:
        ids = [tokenizer.token_id(BOS), tokenizer.token_id(POS)] + tokenizer.encode(text) + [tokenizer.token_id(EOS)]
        assert hf_tokenizer(f"{BOS}{POS}{text}{EOS}")["input_ids"] == ids
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids) == text
        assert hf_tokenizer.decode(ids) == tokenizer.decode(ids, skip_special=False)
    model, loaded = load_pretrained(str(tmp_path / "hf"))[:2]
    assert isinstance(loaded, BPETokenizer) and loaded.hf.get_vocab() == tokenizer.hf.get_vocab()
    assert loaded.special_tokens == tokenizer.special_tokens == special_tokens
    assert loaded.encode(EXTRA_TEXTS[0]) == tokenizer.encode(EXTRA_TEXTS[0])
    original = load(ckpt).model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.state_dict().items())


def test_unknown_tokenizer_types_are_refused(transformers, tmp_path, capsys):
    class WordPieceTokenizer:
        kind = "wordpiece"
    with pytest.raises(HFFormatError, match="cannot export a 'wordpiece' tokenizer"):
        to_hf_tokenizer(WordPieceTokenizer(), 64)
    with pytest.raises(HFFormatError, match="holds a 'Unigram' tokenizer"):
        tokenizer_from_json({"model": {"type": "Unigram", "vocab": []}}, "tokenizer.json")
    from tokenizers import Tokenizer, models
    without_specials = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    with pytest.raises(HFFormatError, match="not a BPE tokenizer mingpt can use: .*<pad> at id 0"):
        tokenizer_from_json(json.loads(without_specials.to_str()), "tokenizer.json")
    ckpt = write_checkpoint(tmp_path / "ckpt.pt")
    payload = torch.load(ckpt, weights_only=True)
    payload["tokenizer"]["type"] = "wordpiece"
    torch.save(payload, ckpt)
    assert export.main(["--ckpt", ckpt, "--out", str(tmp_path / "hf")]) == 2
    assert "unknown tokenizer type 'wordpiece'" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_training_directory(transformers, tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt")
    assert export.main(["--ckpt", ckpt, "--out", str(tmp_path)]) == 2
    assert "holds a training checkpoint" in capsys.readouterr().err


def test_export_without_the_hf_extra_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert export.main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "hf")]) == 1
    assert "pip install -e .[hf]" in capsys.readouterr().err


# --- GPT-NeoX: rotary models ---------------------------------------------------------------------

ROTARY = dict(positions="rotary")
ROTARY_RELU2_UNTIED = dict(positions="rotary", mlp="relu2", tie_head=False)


@pytest.fixture(scope="module", params=[ROTARY, ROTARY_RELU2_UNTIED], ids=["rotary", "rotary-relu2-untied"])
def neox_exported(request, transformers, tmp_path_factory):
    """(checkpoint path, exported directory, options) of a scrambled two-layer rotary model."""
    root = tmp_path_factory.mktemp("neox")
    ckpt = write_checkpoint(root / "ckpt.pt", seed=5, **request.param)
    assert export.main(["--ckpt", ckpt, "--out", str(root / "hf")]) == 0
    return ckpt, str(root / "hf"), request.param


def test_rotary_models_export_as_gpt_neox_with_the_same_logits(neox_exported, transformers):
    ckpt, out, options = neox_exported
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "mingpt.json",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    model = load(ckpt, backend="reference").model
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf_model, transformers.GPTNeoXForCausalLM)
    c = hf_model.config
    assert (c.use_parallel_residual, c.max_position_embeddings, c.intermediate_size) == (False, 64, 128)
    assert c.rope_parameters["rope_theta"] == 10000 and c.rope_parameters["partial_rotary_factor"] == 1.0
    assert c.hidden_act == ("relu2" if options.get("mlp") == "relu2" else "gelu_new")
    assert c.tie_word_embeddings == options.get("tie_head", True)
    tied = hf_model.lm_head.weight.data_ptr() == hf_model.gpt_neox.embed_in.weight.data_ptr()
    assert tied == options.get("tie_head", True)
    idx = torch.randint(model.config.vocab_size, (4, 64))
    torch.testing.assert_close(model(idx)[0], hf_logits(hf_model, idx), rtol=0, atol=LOGIT_ATOL)
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "A character-level GPT-NeoX (positions=rotary" in card and "GPTNeoXForCausalLM.from_pretrained" in card


def test_rotary_greedy_generation_is_token_identical_for_40_tokens(neox_exported, transformers):
    ckpt, out, _ = neox_exported
    loaded = load(ckpt, backend="reference")
    model, tokenizer = loaded.model, loaded.tokenizer
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_model.generation_config.eos_token_id = None
    prompts = torch.tensor([[tokenizer.token_id(BOS), tokenizer.token_id(s)] + tokenizer.encode(t.ljust(10, "。"))
                            for t, s in zip(["", "好看", "剧情拖沓，演技很差"], (POS, NEG, POS))])
    ours = generate(model, prompts, 40, GREEDY, sampler="reference")
    theirs = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=40, do_sample=False)
    assert ours.shape == theirs.shape == (3, 12 + 40)
    assert torch.equal(ours, theirs)
    assert len(set(ours[:, 12:].flatten().tolist())) > 5, "continuations too repetitive to tell anything"


def test_a_gpt_neox_directory_loads_back_bit_identical(neox_exported):
    ckpt, out, options = neox_exported
    original = load(ckpt, backend="reference").model
    loaded = load(out, backend="reference")
    assert loaded.checkpoint is None
    assert dataclasses.asdict(loaded.model.config) == dataclasses.asdict(original.config)
    before, after = original.state_dict(), loaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (loaded.model.lm_head.weight is loaded.model.transformer.wte.weight) == options.get("tie_head", True)
    idx = torch.randint(original.config.vocab_size, (2, 64))
    assert torch.equal(loaded.model(idx)[0], original(idx)[0])


def test_export_verify_passes_on_a_rotary_checkpoint(transformers, tmp_path):
    from test_cli import run
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", seed=2, **ROTARY_RELU2_UNTIED)
    result = run("mingpt.export", "--ckpt", ckpt, "--out", str(tmp_path / "hf"), "--verify", "--backend", "reference")
    assert f"wrote {tmp_path / 'hf'} (GPTNeoXForCausalLM)" in result.stdout
    assert float(re.search(r"max \|logit difference\| (\S+)", result.stdout).group(1)) <= LOGIT_ATOL
    assert "greedy: 8/8 prompts token-identical for 40 new tokens" in result.stdout
    assert "tokenizer: 8/8 texts encode and decode alike" in result.stdout


def test_bias_free_rotary_model_exports_without_attention_biases_and_loads_back(transformers, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", bias=False, seed=4, **ROTARY)
    assert export.main(["--ckpt", ckpt, "--out", str(tmp_path / "hf")]) == 0
    hf_model = transformers.GPTNeoXForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf_model.config.attention_bias is False
    biases = [p for name, p in hf_model.named_parameters() if name.endswith(".bias")]
    assert len(biases) == 2 * 4 + 1 and all(not p.any() for p in biases)  # MLP and layer norms: exact zeros
    original = load(ckpt, backend="reference").model
    idx = torch.randint(original.config.vocab_size, (2, 64))
    torch.testing.assert_close(original(idx)[0], hf_logits(hf_model, idx), rtol=0, atol=LOGIT_ATOL)
    loaded = load_pretrained(str(tmp_path / "hf"), backend="reference")[0]
    assert loaded.config.bias is False and torch.equal(loaded(idx)[0], original(idx)[0])


def test_gpt_neox_directories_written_by_transformers_load(neox_exported, transformers, tmp_path):
    _, out, _ = neox_exported
    hf_model = transformers.GPTNeoXForCausalLM.from_pretrained(out)
    with torch.no_grad():  # as if fine-tuned in transformers
        hf_model.gpt_neox.layers[1].attention.query_key_value.weight.add_(0.1)
        hf_model.lm_head.weight.mul_(1.5)
    hf_model.save_pretrained(tmp_path / "tuned")
    transformers.AutoTokenizer.from_pretrained(out).save_pretrained(tmp_path / "tuned")
    model = load_pretrained(str(tmp_path / "tuned"), backend="reference")[0]
    idx = torch.randint(model.config.vocab_size, (2, 64))
    torch.testing.assert_close(model(idx)[0], hf_logits(hf_model.eval(), idx), rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("options, blocking", [
    (dict(ROTARY, norm="rmsnorm"), "norm=rmsnorm"),
    (dict(ROTARY, qk_norm=True), "qk_norm=True"),
    (dict(ROTARY, logit_softcap=15.0), "logit_softcap=15.0"),
    (dict(ROTARY, bigram_buckets=97), "bigram_buckets=97"),
    (dict(mlp="relu2"), "positions=learned"),
], ids=["rmsnorm", "qk_norm", "softcap", "bigram", "learned-relu2"])
def test_models_neither_gpt2_nor_gpt_neox_computes_are_refused_by_name(transformers, tmp_path, capsys, options,
                                                                       blocking):
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", **options)
    assert export.main(["--ckpt", ckpt, "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    gpt2_part, neox_part = err.split("GPTNeoXForCausalLM cannot compute")
    assert all(f"{name}={value}" in gpt2_part for name, value in options.items())
    assert blocking in neox_part and "mlp" not in neox_part
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("change, message", [
    (dict(use_parallel_residual=True), "use_parallel_residual=True"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
     "partial_rotary_factor=0.25"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 1.0}),
     "rope_theta=500000.0"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), "rope_type='linear'"),
    (dict(rope_parameters=None, rotary_pct=0.5), "partial_rotary_factor=0.5"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(intermediate_size=100), "intermediate_size=100"),
    (dict(attention_bias=False), "attention_bias=False"),
    (dict(hidden_size=31, intermediate_size=124), r"n_embd \(31\) must be divisible by n_head"),
])
def test_gpt_neox_options_mingpt_cannot_compute_are_refused(neox_exported, tmp_path, change, message):
    _, out, _ = neox_exported
    shutil.copytree(out, tmp_path / "hf")
    edit_json(tmp_path / "hf" / "config.json", **change)
    with pytest.raises(HFFormatError, match=message):
        load_pretrained(str(tmp_path / "hf"))


def test_a_default_gpt_neox_is_refused_naming_each_difference(transformers, tmp_path):
    fresh = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=48, intermediate_size=192, max_position_embeddings=32,
        vocab_size=70))
    fresh.save_pretrained(tmp_path / "fresh")
    expected = r"a GPT-NeoX with use_parallel_residual=True, hidden_act='gelu', partial_rotary_factor=0.25 \("
    with pytest.raises(HFFormatError, match=expected):
        load_pretrained(str(tmp_path / "fresh"))
