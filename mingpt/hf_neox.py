"""GPT-NeoX for mingpt models with rotary positions: the mapping between mingpt and `transformers.GPTNeoXForCausalLM`.

A rotary model has no position embedding, so GPT-2 cannot hold it; GPT-NeoX computes it weight for weight when its
blocks run one after the other (use_parallel_residual false: mingpt is sequential pre-LN), every channel of a head
turns (partial_rotary_factor 1.0, rope_theta 10000, the half-split layout of mingpt.model.Rotary) and the rest is
what NeoX has: layer norms, no QK-norm, an MLP of 4*n_embd with a tanh GELU (gelu_new) or ReLU² (relu2), no logit
soft-cap and no bigram embedding. The head may be tied to the token embedding or not (tie_word_embeddings).

NeoX's fused query_key_value holds each head's query, key and value together (row h*3*D + s*D + d), where mingpt's
c_attn holds every query, then every key, then every value (row s*C + h*D + d): the rows are regrouped both ways.
NeoX's MLP and layer norms always have biases: a bias-free model gets exact zeros there (attention_bias false).

mingpt.hf chooses the architecture and writes and reads the directory; this module maps, and refuses what mingpt
cannot compute with a ValueError that mingpt.hf raises again as its HFFormatError.
"""
import torch

from .config import GPTConfig
from .tokenizer import BOS, PAD

ROPE_THETA = 10000.0  # the base of mingpt.model.Rotary
ROPE_PARAMETERS = {"rope_type": "default", "rope_theta": ROPE_THETA, "partial_rotary_factor": 1.0}
# transformers' ACT2FN names: gelu_new is the tanh approximation of GELU, relu2 is relu(x)^2.
HIDDEN_ACTS = {"gelu": "gelu_new", "relu2": "relu2"}
MLPS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu2": "relu2"}
# What a GPT-NeoX needs of a mingpt model; mlp, tie_head and bias may be either.
NEOX_OPTIONS = dict(positions="rotary", norm="layernorm", qk_norm=False, logit_softcap=0.0, bigram_buckets=0)
# GPTNeoXConfig defaults, for keys that a config.json written by transformers leaves out.
NEOX_DEFAULTS = dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                     intermediate_size=24576, hidden_act="gelu", hidden_dropout=0.0, max_position_embeddings=2048,
                     layer_norm_eps=1e-5, tie_word_embeddings=False, use_parallel_residual=True, attention_bias=True)
LAYER_MODULES = {"ln_1": "input_layernorm", "attn.c_attn": "attention.query_key_value",
                 "attn.c_proj": "attention.dense", "ln_2": "post_attention_layernorm",
                 "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h"}
# Buffers older transformers versions saved alongside the weights.
IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".inv_freq")


def neox_blockers(config: GPTConfig) -> list:
    """The options of `config` GPTNeoXForCausalLM cannot compute, as name=value (positions=learned: a GPT-2)."""
    return [f"{name}={getattr(config, name)}" for name, value in NEOX_OPTIONS.items() if getattr(config, name) != value]


def neox_config(config: GPTConfig, tokenizer, eos_token: str):
    """The GPTNeoXConfig of a mingpt model it can compute: attention dropout 0, generation ends at eos_token."""
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                         num_attention_heads=config.n_head, intermediate_size=4 * config.n_embd,
                         hidden_act=HIDDEN_ACTS[config.mlp], hidden_dropout=config.dropout, attention_dropout=0.0,
                         max_position_embeddings=config.block_size, layer_norm_eps=config.layer_norm_eps,
                         use_parallel_residual=False, rope_parameters=dict(ROPE_PARAMETERS),
                         attention_bias=config.bias, tie_word_embeddings=config.tie_head,
                         bos_token_id=tokenizer.token_id(BOS), eos_token_id=tokenizer.token_id(eos_token),
                         pad_token_id=tokenizer.token_id(PAD))


def neox_modules(n_layer: int) -> dict:
    """mingpt's name of each module with weights, and GPTNeoXForCausalLM's."""
    names = {"transformer.wte": "gpt_neox.embed_in", "transformer.ln_f": "gpt_neox.final_layer_norm",
             "lm_head": "lm_head"}
    for i in range(n_layer):
        names.update({f"transformer.h.{i}.{ours}": f"gpt_neox.layers.{i}.{theirs}"
                      for ours, theirs in LAYER_MODULES.items()})
    return names


def regroup_rows(w: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """w with its rows, laid out as (groups, per_group, rows of each), laid out as (per_group, groups, rows of each)."""
    return w.reshape(groups, per_group, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape).contiguous()


def to_neox_state_dict(state: dict, config: GPTConfig) -> dict:
    """mingpt weights under GPTNeoXForCausalLM's names and qkv layout; a bias-free model gets exact zero biases in
    the MLP and the layer norms, which NeoX always has."""
    modules = neox_modules(config.n_layer)
    neox = {}
    for name, w in state.items():
        module, param = name.rsplit(".", 1)
        neox[f"{modules[module]}.{param}"] = regroup_rows(w, 3, config.n_head) if module.endswith("c_attn") else w
    if not config.bias:
        for ours, theirs in modules.items():
            if ".ln_" in ours or ".mlp." in ours:
                weight = neox[f"{theirs}.weight"]
                neox[f"{theirs}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return neox


def from_neox_state_dict(neox: dict, config: GPTConfig, source: str) -> dict:
    """GPTNeoXForCausalLM weights (the head as embed_out, its name in the files transformers writes, or lm_head)
    under mingpt's names and layout. A tied head is the token embedding, as transformers makes it; a bias-free
    model's biases must be zeros. Names it does not know are kept, for the caller to refuse."""
    modules = {theirs: ours for ours, theirs in neox_modules(config.n_layer).items()}
    state = {}
    for name, w in neox.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        module, param = name.rsplit(".", 1)
        module = "lm_head" if module == "embed_out" else module
        qkv = module.endswith("query_key_value")
        state[f"{modules.get(module, module)}.{param}"] = regroup_rows(w, config.n_head, 3) if qkv else w
    if config.tie_head and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    for name in [name for name in state if name.endswith(".bias") and not config.bias]:
        if bool(state.pop(name).any()):
            raise ValueError(f"{source}: mingpt.json says the model has no biases, but {name} is not zero")
    return state


def rope_of(hf_config: dict) -> dict:
    """A config.json's rotary positions: rope_parameters, or what older ones say (rope_scaling, rotary_pct,
    rotary_emb_base), with GPTNeoXConfig's defaults."""
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    return {"rope_type": rope.get("rope_type", rope.get("type", "default")),
            "rope_theta": rope.get("rope_theta", hf_config.get("rotary_emb_base", ROPE_THETA)),
            "partial_rotary_factor": rope.get("partial_rotary_factor", hf_config.get("rotary_pct", 0.25))}


def neox_load_blockers(hf_config: dict, bias: bool) -> list:
    """What mingpt's GPT cannot compute in a GPT-NeoX config.json (with NEOX_DEFAULTS), as name=value; with `bias`
    (mingpt.json's) every linear has a bias, without it none has (the MLP's and the norms' are zeros)."""
    c = {**NEOX_DEFAULTS, **hf_config, **rope_of(hf_config)}
    required = {"use_parallel_residual": c["use_parallel_residual"] is False,
                "attention_bias": c["attention_bias"] is bias,
                "hidden_act": c["hidden_act"] in MLPS,
                "intermediate_size": c["intermediate_size"] == 4 * c["hidden_size"],
                "rope_type": c["rope_type"] == "default",
                "rope_theta": c["rope_theta"] == ROPE_THETA,
                "partial_rotary_factor": c["partial_rotary_factor"] == 1.0}
    return [f"{key}={c[key]!r}" for key, ok in required.items() if not ok]


def mingpt_neox_config(hf_config: dict, bias: bool, source: str) -> GPTConfig:
    """The GPTConfig of a GPT-NeoX config.json, refusing options mingpt's model does not compute."""
    unsupported = neox_load_blockers(hf_config, bias)
    if unsupported:
        raise ValueError(f"{source}: mingpt's GPT cannot compute a GPT-NeoX with {', '.join(unsupported)} (it runs "
                         "sequential pre-LN blocks, rotary positions of base 10000 on every channel of a head, a tanh "
                         f"GELU or ReLU² MLP of 4*n_embd, and attention biases where mingpt.json says bias: {bias})")
    c = {**NEOX_DEFAULTS, **hf_config}
    return GPTConfig(n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"], n_embd=c["hidden_size"],
                     block_size=c["max_position_embeddings"], vocab_size=c["vocab_size"],
                     dropout=float(c["hidden_dropout"]), bias=bias, layer_norm_eps=float(c["layer_norm_eps"]),
                     positions="rotary", mlp=MLPS[c["hidden_act"]], tie_head=bool(c["tie_word_embeddings"]))
