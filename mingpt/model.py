"""A GPT in the nanoGPT tradition: learned positions, pre-LN blocks, tanh-GELU MLP, tied embeddings.

Every hot-path op goes through the op table (mingpt.ops), so one model runs on any backend.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .ops import get_ops


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, ops):
        y = ops.causal_attention(self.c_attn(x), self.n_head)
        return ops.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, ops):
        h = ops.bias_gelu(F.linear(x, self.c_fc.weight), self.c_fc.bias)
        return ops.dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, ops):
        x = x + self.attn(ops.layer_norm(x, self.ln_1.weight, self.ln_1.bias), ops)
        return x + self.mlp(ops.layer_norm(x, self.ln_2.weight, self.ln_2.bias), ops)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.backend = backend
        self._resolved_ops = None

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def ops(self):
        """The op table of `self.backend` for the device the weights are on, resolved once per device."""
        device = self.transformer.wte.weight.device
        if self._resolved_ops is None or self._resolved_ops[0] != (self.backend, device):
            self._resolved_ops = ((self.backend, device), get_ops(self.backend, device))
        return self._resolved_ops[1]

    def set_backend(self, backend: str):
        """Choose the op backend (see mingpt.ops); resolved for the weights' device on next use."""
        self.backend = backend
        self._resolved_ops = None
        return self

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None):
        if idx.dim() != 2:
            raise ValueError(f"GPT.forward expects idx of shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
        ops = self.ops
        pos = torch.arange(T, device=idx.device)
        x = ops.dropout(self.transformer.wte(idx) + self.transformer.wpe(pos), self.config.dropout, self.training)
        for block in self.transformer.h:
            x = block(x, ops)
        x = ops.layer_norm(x, self.transformer.ln_f.weight, self.transformer.ln_f.bias)
        logits = self.lm_head(x)
        loss = ops.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss

    def configure_optimizer(self, weight_decay, learning_rate, betas):
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size

    @classmethod
    def from_checkpoint(cls, path, device="cpu", backend="auto"):
        """Load a checkpoint written by `mingpt.train`; returns (model, tokenizer)."""
        from .checkpoint import load_model
        return load_model(path, device=device, backend=backend)

    @classmethod
    def from_pretrained(cls, path, device="cpu", backend="auto"):
        """Load a Hugging Face GPT-2 directory (see mingpt.hf); returns (model, tokenizer or None)."""
        from .hf import load_pretrained
        model, tokenizer, _ = load_pretrained(path, device=device, backend=backend)
        return model, tokenizer

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 eos_id=None, seed=None, sampler="auto"):
        from .sampling import generate
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_id=eos_id, seed=seed, sampler=sampler)
