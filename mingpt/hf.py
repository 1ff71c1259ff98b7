"""Hugging Face GPT-2 and GPT-NeoX directories: export a mingpt model with its tokenizer, and load one back.

mingpt's GPT is GPT-2's architecture by default, so a model maps onto `transformers.GPT2LMHeadModel` weight
for weight: the same names, with the four projection matrices transposed (GPT-2 keeps them in
Conv1D layout). A model with rotary positions, which GPT-2 cannot hold, is exported as a
`GPTNeoXForCausalLM` where NeoX computes it exactly (mingpt.hf_neox: rotary positions with layer norms,
a GELU or ReLU² MLP, a tied or untied head); any other option is refused by name. An exported directory holds

  config.json, generation_config.json, model.safetensors   GPT2LMHeadModel or GPTNeoXForCausalLM
  tokenizer.json, tokenizer_config.json                     the tokenizer (character or BPE), for AutoTokenizer
  mingpt.json                                               what GPT-2's config cannot say (below)
  README.md                                                 the model card

mingpt.json records the data layout, its end token and whether the biases are structural zeros
(a bias-free mingpt model is exported with exact zero biases, which computes the same function).
A directory that transformers wrote itself has no mingpt.json: it loads as the `review` layout
ending at <eos>, with biases.

Writing needs transformers, tokenizers and safetensors; reading back needs only safetensors.
"""
import copy
import importlib
import json
import math
import os

import torch

from .config import GPTConfig
from .data.layouts import get_layout
from .hf_neox import from_neox_state_dict, mingpt_neox_config, neox_blockers, neox_config, to_neox_state_dict
from .model import GPT
from .sample.engine import generate
from .sample.settings import SamplingSettings
from .tokenizer import BOS, EOS, NEG, PAD, POS, CharTokenizer, tokenizer_from_dict

INSTALL_HINT = "pip install -e .[hf]"
METADATA_FILE = "mingpt.json"
METADATA_FORMAT = "mingpt-hf-v1"
DEFAULT_METADATA = {"layout": "review", "eos_token": EOS, "bias": True}
# Stored transposed by GPT-2 (Conv1D: weight is (in, out)).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Both compute the tanh approximation of GELU that mingpt uses.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# GPT2Config defaults, for keys that a config.json written by transformers leaves out.
GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                     activation_function="gelu_new", resid_pdrop=0.1, layer_norm_epsilon=1e-5,
                     scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                     add_cross_attention=False)
# Buffers older transformers versions saved alongside the weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# model_type: the transformers class of an export, and what its model card calls it.
ARCHITECTURES = {"gpt2": ("GPT2LMHeadModel", "GPT-2"), "gpt_neox": ("GPTNeoXForCausalLM", "GPT-NeoX")}


class HFFormatError(ValueError):
    """A model or directory that cannot cross between mingpt and GPT-2 or GPT-NeoX; the message says why."""


class MissingDependency(RuntimeError):
    """An optional package for the Hugging Face format is not installed."""


def require(*modules):
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MissingDependency(f"the Hugging Face format needs the '{name}' package ({e}); "
                                    f"install the extra with `{INSTALL_HINT}`") from None


def is_pretrained_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


# --- weights -----------------------------------------------------------------------------------

def bias_names(state: dict) -> list:
    """The bias of every linear and layer norm, named after its weight."""
    return [name[:-len("weight")] + "bias" for name in state
            if name.endswith(".weight") and not name.startswith(("transformer.wte", "transformer.wpe", "lm_head"))]


def to_hf_state_dict(state: dict, config: GPTConfig) -> dict:
    """mingpt weights under GPT2LMHeadModel's names and layouts; a bias-free model gets exact zero biases."""
    hf = {name: (w.t() if name.endswith(CONV1D_WEIGHTS) else w).contiguous() for name, w in state.items()}
    if not config.bias:
        for name in bias_names(state):
            weight = state[name[:-len("bias")] + "weight"]
            hf[name] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return hf


def from_hf_state_dict(hf: dict, config: GPTConfig, source: str) -> dict:
    """The inverse of to_hf_state_dict; checks the tied head and that a bias-free model's biases are zero."""
    state = {name: (w.t() if name.endswith(CONV1D_WEIGHTS) else w).contiguous() for name, w in hf.items()
             if not name.endswith(IGNORED_SUFFIXES)}
    if "transformer.wte.weight" not in state:
        raise HFFormatError(f"{source} has no transformer.wte.weight: expected GPT2LMHeadModel weights")
    head = state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    if not torch.equal(head, state["transformer.wte.weight"]):
        raise HFFormatError(f"{source}: lm_head.weight differs from transformer.wte.weight; mingpt ties the "
                            "output head to the token embedding (tie_word_embeddings)")
    if not config.bias:
        for name in bias_names(state):
            bias = state.pop(name, None)
            if bias is not None and bool(bias.any()):
                raise HFFormatError(f"{source}: {METADATA_FILE} says the model has no biases, but {name} is not zero")
    return state


def gpt2_config(config: GPTConfig, tokenizer, eos_token: str):
    """The GPT2Config of a mingpt model: attention dropout 0 (mingpt has none), generation ends at eos_token."""
    from transformers import GPT2Config
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                      resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=0.0,
                      layer_norm_epsilon=config.layer_norm_eps, tie_word_embeddings=True,
                      bos_token_id=tokenizer.token_id(BOS), eos_token_id=tokenizer.token_id(eos_token),
                      pad_token_id=tokenizer.token_id(PAD))


def check_gpt2_architecture(config: GPTConfig):
    """Refuse, by name, the architecture options GPT2LMHeadModel cannot compute."""
    options = config.options_after_gpt2()
    if options:
        raise HFFormatError(f"a GPT-2 export holds GPT-2's architecture; this model has {', '.join(options)}, "
                            "which GPT2LMHeadModel cannot compute")


def export_architecture(config: GPTConfig) -> str:
    """The model_type that computes `config` exactly, 'gpt2' first, then 'gpt_neox'; a model neither can
    compute is refused, naming the options that block each."""
    try:
        check_gpt2_architecture(config)
    except HFFormatError as gpt2:
        if neox := neox_blockers(config):
            raise HFFormatError(f"{gpt2}; a GPT-NeoX export holds rotary positions with layer norms and a GELU or "
                                f"ReLU² MLP, and GPTNeoXForCausalLM cannot compute {', '.join(neox)}") from None
        return "gpt_neox"
    return "gpt2"


def to_hf_model(model: GPT, tokenizer, eos_token: str = EOS):
    """A transformers GPT2LMHeadModel, or GPTNeoXForCausalLM (export_architecture), in eval mode holding the same
    weights as `model`."""
    require("transformers")
    import transformers
    config, state = model.config, model.state_dict()
    if export_architecture(config) == "gpt_neox":
        hf_model = transformers.GPTNeoXForCausalLM(neox_config(config, tokenizer, eos_token))
        hf_model.load_state_dict(to_neox_state_dict(state, config), strict=True)
    else:
        hf_model = transformers.GPT2LMHeadModel(gpt2_config(config, tokenizer, eos_token))
        hf_model.load_state_dict(to_hf_state_dict(state, config), strict=True)
    return hf_model.eval()


# --- tokenizer ---------------------------------------------------------------------------------

def to_hf_tokenizer(tokenizer, block_size: int):
    """mingpt's tokenizer as a transformers fast tokenizer that encodes and decodes alike, specials included."""
    kind = getattr(tokenizer, "kind", None)
    if kind not in ("char", "bpe"):
        raise HFFormatError(f"cannot export a {kind or type(tokenizer).__name__!r} tokenizer: "
                            "a GPT-2 export knows the 'char' and 'bpe' tokenizers")
    require("tokenizers", "transformers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    if kind == "bpe":
        core = Tokenizer.from_str(tokenizer.hf.to_str())
    else:
        # No unknown token: like CharTokenizer.encode, encoding an unknown character is an error.
        core = Tokenizer(models.WordLevel(dict(tokenizer.stoi), unk_token=None))
        core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        core.decoder = decoders.Fuse()  # join tokens without spaces
        core.add_special_tokens(list(tokenizer.special_tokens))
    others = [t for t in tokenizer.special_tokens if t not in (BOS, EOS, PAD)]
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens=others, clean_up_tokenization_spaces=False,
                                   model_max_length=block_size)


def tokenizer_from_json(data: dict, source: str):
    """Read back a tokenizer.json that to_hf_tokenizer wrote: a CharTokenizer or a BPETokenizer."""
    kind = (data.get("model") or {}).get("type")
    if kind == "BPE":
        try:
            return tokenizer_from_dict({"type": "bpe", "tokenizers_json": json.dumps(data)})
        except ValueError as e:
            raise HFFormatError(f"{source} is not a BPE tokenizer mingpt can use: {e}") from None
    if kind != "WordLevel":
        raise HFFormatError(f"{source} holds a {kind!r} tokenizer; mingpt reads the character-level "
                            "(WordLevel, one token per character) and BPE tokenizers it exports")
    vocab = data["model"]["vocab"]
    specials = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []) if t.get("special"))
    if [i for i, _ in specials] != list(range(len(specials))):
        raise HFFormatError(f"{source}: special tokens must have the first ids, got {specials}")
    special_set = {content for _, content in specials}
    chars = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if token not in special_set]
    try:
        tokenizer = CharTokenizer(chars, [content for _, content in specials])
    except ValueError as e:
        raise HFFormatError(f"{source} is not a character tokenizer: {e}") from None
    if tokenizer.stoi != vocab:
        raise HFFormatError(f"{source}: token ids are not special tokens first, then characters in order")
    return tokenizer


# --- directories -------------------------------------------------------------------------------

def model_card(ckpt: dict, model: GPT, tokenizer, out_dir: str) -> str:
    config, data = model.config, ckpt["data"]
    model_type = export_architecture(config)
    hf_class, title = ARCHITECTURES[model_type]
    options = config.options_after_gpt2()
    architecture = f"{title} ({', '.join(options)})" if options else title
    tokens = "character-level" if tokenizer.kind == "char" else "byte-level BPE"
    review = get_layout(data.get("layout")).review_format
    preset = (ckpt.get("train_config") or {}).get("preset", "unknown")
    val_loss = ckpt.get("best_val_loss")
    val_text = (f"{float(val_loss):.4f} nats per token" if isinstance(val_loss, (int, float)) and math.isfinite(val_loss)
                else "not recorded")
    name = os.path.basename(os.path.abspath(out_dir))
    return f"""---
library_name: transformers
pipeline_tag: text-generation
language: zh
tags: [{model_type}, mingpt]
---
# {name}

A {tokens} {architecture} trained with mingpt on sentiment-labelled Chinese reviews.

- preset: `{preset}`: {config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}, context {config.block_size}, vocabulary {config.vocab_size}, {model.num_params():,} parameters
- data: {data.get('source') or 'unknown'}, `{data.get('layout')}` layout: a review reads {review}
- trained for {ckpt.get('iter_num', 'an unrecorded number of')} iterations; validation loss {val_text}

```python
from transformers import AutoTokenizer, {hf_class}
model, tok = {hf_class}.from_pretrained("{name}"), AutoTokenizer.from_pretrained("{name}")
print(tok.decode(model.generate(**tok("<bos><pos>", return_tensors="pt"), max_new_tokens=40, do_sample=True)[0], skip_special_tokens=True))
```

Back in mingpt: `mingpt.load("{name}")` or `python -m mingpt.sample --ckpt {name}`.
"""


def save_pretrained(ckpt: dict, model: GPT, tokenizer, out_dir: str) -> str:
    """Write a mingpt checkpoint (its dict, and the model and tokenizer it holds) as a Hugging Face GPT-2 or
    GPT-NeoX directory (export_architecture); returns out_dir."""
    require("transformers", "tokenizers", "safetensors")
    if os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        raise HFFormatError(f"{out_dir} holds a training checkpoint (ckpt.pt); export into another directory")
    data = ckpt["data"]
    hf_tokenizer = to_hf_tokenizer(tokenizer, model.config.block_size)  # refuses before anything is written
    hf_model = to_hf_model(model, tokenizer, data["eos_token"])  # refuses what neither GPT-2 nor GPT-NeoX computes
    os.makedirs(out_dir, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    hf_tokenizer.save_pretrained(out_dir)
    metadata = {"format": METADATA_FORMAT, "layout": data["layout"], "eos_token": data["eos_token"],
                "source": data.get("source"), "bias": model.config.bias}
    with open(os.path.join(out_dir, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(metadata, f, ensure_ascii=False, indent=2)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(ckpt, model, tokenizer, out_dir))
    return out_dir


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{path} is not valid JSON: {e}") from None


def mingpt_config(hf_config: dict, bias: bool, source: str) -> GPTConfig:
    """The GPTConfig of a GPT-2 config.json, refusing options mingpt's model does not compute."""
    c = {**GPT2_DEFAULTS, **hf_config}
    if c.get("model_type") != "gpt2":
        raise HFFormatError(f"{source}: model_type is {c.get('model_type')!r}, mingpt loads 'gpt2' and 'gpt_neox'")
    required = {"activation_function": c["activation_function"] in TANH_GELUS,
                "n_inner": c["n_inner"] in (None, 4 * c["n_embd"]),
                "scale_attn_weights": c["scale_attn_weights"] is True,
                "scale_attn_by_inverse_layer_idx": c["scale_attn_by_inverse_layer_idx"] is False,
                "add_cross_attention": c["add_cross_attention"] is False}
    unsupported = [f"{key}={c[key]!r}" for key, ok in required.items() if not ok]
    if unsupported:
        raise HFFormatError(f"{source}: mingpt's GPT cannot compute a GPT-2 with {', '.join(unsupported)} "
                            f"(it uses a tanh GELU, an MLP of 4*n_embd, 1/sqrt(head_dim) attention)")
    try:
        return GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["n_positions"],
                         vocab_size=c["vocab_size"], dropout=float(c["resid_pdrop"]), bias=bias,
                         layer_norm_eps=float(c["layer_norm_epsilon"]))
    except ValueError as e:
        raise HFFormatError(f"{source}: {e}") from None


def read_model(path: str, bias: bool, backend: str) -> GPT:
    """The model of a GPT-2 or GPT-NeoX directory: its config.json and model.safetensors."""
    from safetensors.torch import load_file
    config_path, weights_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    hf_config = read_json(config_path)
    neox = hf_config.get("model_type") == "gpt_neox"
    try:  # mingpt.hf_neox refuses with ValueError
        config = (mingpt_neox_config if neox else mingpt_config)(hf_config, bias, config_path)
        if not os.path.isfile(weights_path):
            raise HFFormatError(f"{path} has no model.safetensors (sharded or pytorch_model.bin weights are not read)")
        state = (from_neox_state_dict if neox else from_hf_state_dict)(load_file(weights_path), config, weights_path)
    except ValueError as e:
        raise HFFormatError(str(e)) from None
    model = GPT(config, backend=backend)
    expected = model.state_dict()
    mismatched = sorted(set(expected) ^ set(state)) + [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
        if k in state and state[k].shape != v.shape]
    if mismatched:
        raise HFFormatError(f"{weights_path} does not match its config.json: {mismatched[:5]}")
    model.load_state_dict(state)
    return model


def load_pretrained(path: str, device="cpu", backend="auto", require_tokenizer=False):
    """A GPT-2 or GPT-NeoX directory: (model in eval mode, tokenizer or None, data {layout, eos_token, source})."""
    if not is_pretrained_dir(path):
        raise HFFormatError(f"{path} is not a Hugging Face model directory (no config.json)")
    require("safetensors")
    metadata_path = os.path.join(path, METADATA_FILE)
    metadata = {**DEFAULT_METADATA, **(read_json(metadata_path) if os.path.isfile(metadata_path) else {})}
    try:
        get_layout(metadata["layout"])
    except ValueError as e:
        raise HFFormatError(f"{metadata_path}: {e}") from None
    model = read_model(path, metadata["bias"], backend)
    config = model.config
    tokenizer_path = os.path.join(path, "tokenizer.json")
    tokenizer = None
    if os.path.isfile(tokenizer_path):
        tokenizer = tokenizer_from_json(read_json(tokenizer_path), tokenizer_path)
        if tokenizer.vocab_size != config.vocab_size:
            raise HFFormatError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but config.json says "
                                f"vocab_size {config.vocab_size}")
        try:
            tokenizer.token_id(metadata["eos_token"])
        except (KeyError, ValueError):
            raise HFFormatError(f"{path}: end token {metadata['eos_token']!r} is not a token of the tokenizer") from None
    elif require_tokenizer:
        raise HFFormatError(f"{path} has no tokenizer.json; mingpt needs its tokenizer to read text")
    data = {k: metadata.get(k) for k in ("layout", "eos_token", "source")}
    return model.to(device).eval(), tokenizer, data


# --- verification against transformers ---------------------------------------------------------

@torch.no_grad()
def compare_with_transformers(model: GPT, tokenizer, hf_dir: str, n_prompts=8, new_tokens=40, seed=0,
                              sampler="auto") -> dict:
    """mingpt (a CPU fp32 model) against transformers loading hf_dir, which holds the same weights:
    the max |logit difference| on random full-block prompts (and, as the scale of fp32 rounding,
    mingpt's own max difference from an fp64 run of it), how many greedy continuations agree
    token for token (the end token does not stop either side), and on how many of those
    continuations, as text, the two tokenizers encode and decode alike, special tokens included."""
    require("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model.eval()
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    generator = torch.Generator().manual_seed(seed)
    block, n_special = model.config.block_size, len(tokenizer.special_tokens)

    idx = torch.randint(model.config.vocab_size, (n_prompts, block), generator=generator)
    logits = model(idx)[0]
    max_logit_diff = (logits - hf_model(idx).logits).abs().max().item()
    fp64 = copy.deepcopy(model).set_backend("reference").double()
    fp32_error = (logits.double() - fp64(idx)[0]).abs().max().item()

    prompt_len = min(10, block - 1)
    new_tokens = min(new_tokens, block - prompt_len)
    sentiments = [(POS, NEG)[i % 2] for i in range(n_prompts)]
    body = torch.randint(n_special, tokenizer.vocab_size, (n_prompts, prompt_len - 2), generator=generator)
    starts = torch.tensor([[tokenizer.token_id(BOS), tokenizer.token_id(s)] for s in sentiments])
    prompts = torch.cat([starts, body], dim=1)
    ours = generate(model, prompts, new_tokens, SamplingSettings.plain(temperature=0), sampler=sampler)
    hf_model.generation_config.eos_token_id = None
    theirs = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                               do_sample=False)
    greedy_identical = sum(torch.equal(a, b) for a, b in zip(ours, theirs))

    tokenizer_identical = 0
    for row, sentiment in zip(ours.tolist(), sentiments):
        text = tokenizer.decode(row)  # prompt and continuation, special tokens dropped
        ids = [tokenizer.token_id(BOS), tokenizer.token_id(sentiment)] + tokenizer.encode(text) + [tokenizer.token_id(EOS)]
        tokenizer_identical += (hf_tokenizer(f"{BOS}{sentiment}{text}{EOS}")["input_ids"] == ids
                                and hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids) == text
                                and hf_tokenizer.decode(ids) == tokenizer.decode(ids, skip_special=False))
    return {"max_logit_diff": max_logit_diff, "fp32_error": fp32_error, "logit_prompts": n_prompts, "prompt_tokens": block,
            "greedy_identical": greedy_identical, "greedy_prompts": n_prompts, "new_tokens": new_tokens,
            "tokenizer_identical": tokenizer_identical, "tokenizer_texts": n_prompts}
