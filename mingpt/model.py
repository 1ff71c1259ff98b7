"""A GPT in the nanoGPT tradition: learned positions, pre-LN blocks, tanh-GELU MLP, tied embeddings.

Every hot-path op goes through the op table (mingpt.ops), so one model runs on any backend. One
forward serves training, prefill and decode (as in gpt-fast): given a KVCache and the position
of its first token, a call writes its keys and values into the cache and attends to every cached
position up to its own.

GPTConfig's architecture options (RMSNorm, rotary positions, QK-norm, ReLU², an untied head, logit
soft-capping, a hashed bigram embedding) are GPT-2's by default. Rotary positions and QK-norm change the queries and keys inside the
fused qkv projection before the attention op, so every attention kernel, the cached ones too, serves them.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .ops import BackendUnavailable, get_ops
from .optim import Muon, fused_adamw


OPTIMIZERS = ("adamw", "muon")


class KVCache:
    """Keys and values of every layer for a batch of sequences of up to block_size positions, and the
    sequences' tokens (the bigram embedding reads the token before each new one)."""

    def __init__(self, config: GPTConfig, batch_size: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self._hold(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(batch_size, config.block_size, device=device, dtype=torch.long))

    def _hold(self, keys, values, tokens):
        self.keys, self.values, self.tokens = keys, values, tokens
        self.layers = list(zip(self.keys, self.values))  # (keys, values) of each layer, views into the two

    def rows(self, first: int, end: int) -> "KVCache":
        """The sequences first..end-1 as a cache of their own that shares this one's memory."""
        view = KVCache.__new__(KVCache)
        view._hold(self.keys[:, first:end], self.values[:, first:end], self.tokens[first:end])
        return view

    def move_rows(self, sources: list, targets: list):
        """Copy the sequences at `sources` onto those at `targets` (the server compacting its running batch)."""
        src, dst = (torch.tensor(rows, dtype=torch.long, device=self.keys.device) for rows in (sources, targets))
        self.keys[:, dst] = self.keys[:, src]
        self.values[:, dst] = self.values[:, src]
        self.tokens[dst] = self.tokens[src]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def keep_rows(self, rows: torch.Tensor):
        """Drop every sequence but `rows` (indices into the batch, in their new order)."""
        self._hold(self.keys[:, rows], self.values[:, rows], self.tokens[rows])

    def previous_tokens(self, idx, start):
        """The token before each of idx's in its sequence (-1 at position 0), and idx written into the cache.
        start: the position of idx's first column, or each row's position of its one token (a LongTensor)."""
        if isinstance(start, torch.Tensor):
            rows = torch.arange(idx.shape[0], device=idx.device)
            before = torch.where(start > 0, self.tokens[rows, (start - 1).clamp_min(0)], -1)
            self.tokens[rows, start] = idx[:, 0]
            return before[:, None]
        first = self.tokens[:, start - 1:start] if start else torch.full_like(idx[:, :1], -1)
        self.tokens[:, start:start + idx.shape[1]] = idx
        return torch.cat([first, idx[:, :-1]], dim=1)


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x, ops):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, ndim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x, ops):
        return ops.rms_norm(x, self.weight, self.eps)


def make_norm(config: GPTConfig, ndim: int):
    if config.norm == "rmsnorm":
        return RMSNorm(ndim, config.layer_norm_eps)
    return LayerNorm(ndim, config.bias, config.layer_norm_eps)


class LinearActivation(nn.Linear):
    """activation(x W^T + b), GELU or ReLU². The bias is added inside the activation op, where fused
    backends add it in the same pass."""

    def __init__(self, in_features: int, out_features: int, bias: bool, activation: str):
        super().__init__(in_features, out_features, bias=bias)
        self.activation = activation

    def forward(self, x, ops):
        op = ops.bias_relu2 if self.activation == "relu2" else ops.bias_gelu
        return op(F.linear(x, self.weight), self.bias)


class BigramEmbedding(nn.Module):
    """An embedding of each (previous token, token) pair, hashed into `buckets` rows (a Chinese word is often
    two characters); a token with no previous one in its review takes a row of its own. Starts at zero."""

    def __init__(self, buckets: int, n_embd: int):
        super().__init__()
        self.buckets = buckets
        self.weight = nn.Parameter(torch.zeros(buckets + 1, n_embd))

    def forward(self, previous, idx):
        pairs = torch.where(previous < 0, self.buckets, (previous * 1_000_003 + idx) % self.buckets)
        return F.embedding(pairs, self.weight)


class Rotary(nn.Module):
    """Rotary position embedding: channel i of a head's first half and channel i of its second half turn
    together by position x base^(-2i / head_dim) (the half-split layout of Llama and GPT-NeoX)."""

    def __init__(self, head_dim: int, block_size: int, base: float = 10000.0):
        super().__init__()
        frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float64), frequencies)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions):
        """cos and sin of the angles at positions (B or 1, T): each (B or 1, T, head_dim / 2), float32, for
        the op table's `rotary` to turn queries and keys by."""
        return self.cos[positions], self.sin[positions]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        head_dim = config.n_embd // config.n_head
        self.q_norm = RMSNorm(head_dim, config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(head_dim, config.layer_norm_eps) if config.qk_norm else None

    def queries_and_keys(self, qkv, ops, angles):
        """qkv with its queries and keys normalised (QK-norm) and rotated (rotary positions: angles, the
        cos and sin of Rotary)."""
        if self.q_norm is not None:
            B, T, C3 = qkv.shape
            q, k, v = qkv.view(B, T, 3, self.n_head, C3 // (3 * self.n_head)).unbind(2)
            qkv = torch.stack((self.q_norm(q, ops), self.k_norm(k, ops), v), dim=2).view(B, T, C3)
        if angles is not None:
            qkv = ops.rotary(qkv, *angles, self.n_head)
        return qkv

    def forward(self, x, ops, cache=None, start=0, starts=None, angles=None):
        qkv = self.c_attn(x)
        if self.q_norm is not None or angles is not None:
            qkv = self.queries_and_keys(qkv, ops, angles)
        if cache is None:
            y = ops.causal_attention(qkv, self.n_head, starts)
        else:
            y = ops.cached_attention(qkv, self.n_head, *cache, start)
        return ops.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = LinearActivation(config.n_embd, 4 * config.n_embd, config.bias, config.mlp)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, ops):
        return ops.dropout(self.c_proj(self.c_fc(x, ops)), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, ops, cache=None, start=0, starts=None, angles=None):
        x = x + self.attn(self.ln_1(x, ops), ops, cache, start, starts, angles)
        return x + self.mlp(self.ln_2(x, ops), ops)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        layers["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        layers["ln_f"] = make_norm(config, config.n_embd)
        self.transformer = nn.ModuleDict(layers)
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size) if config.positions == "rotary" else None
        self.bigram = BigramEmbedding(config.bigram_buckets, config.n_embd) if config.bigram_buckets else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if not config.tie_head:
            nn.init.zeros_(self.lm_head.weight)  # an untied head starts from uniform predictions
        self.set_backend(backend)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def ops(self):
        """The op table of `self.backend` for the weights' device. It is resolved when the backend is
        chosen and whenever the weights move, so that forward (a compiled one too) only reads it."""
        if self._ops_unavailable is not None:
            raise BackendUnavailable(self._ops_unavailable)
        return self._ops

    def set_backend(self, backend: str):
        """Choose the op backend (see mingpt.ops); a backend that cannot run on this device raises at forward."""
        self.backend = backend
        self._resolve_ops()
        return self

    def _resolve_ops(self):
        try:
            self._ops, self._ops_unavailable = get_ops(self.backend, self.device), None
        except BackendUnavailable as e:
            self._ops, self._ops_unavailable = None, str(e)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self._resolve_ops()
        return module

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and "wpe" in self.transformer else n

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache for `batch_size` sequences, on the weights' device and in their dtype."""
        return KVCache(self.config, batch_size, self.device, self.transformer.wte.weight.dtype)

    def check_inputs(self, idx, targets, cache, start, starts):
        if idx.dim() != 2:
            raise ValueError(f"GPT.forward expects idx of shape (B, T), got {tuple(idx.shape)}")
        if isinstance(start, torch.Tensor):
            self.check_row_positions(idx, cache, start)
            return
        if start + idx.shape[1] > self.config.block_size:
            where = f"positions {start}..{start + idx.shape[1] - 1}" if start else f"sequence length {idx.shape[1]}"
            raise ValueError(f"{where} exceeds block_size {self.config.block_size}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
        if cache is None and start:
            raise ValueError("GPT.forward: a start position needs the KV cache that holds the earlier positions")
        if cache is not None and cache.batch_size != idx.shape[0]:
            raise ValueError(f"the KV cache holds {cache.batch_size} sequences, idx {idx.shape[0]}")
        if starts is not None:
            if cache is not None:
                raise ValueError("GPT.forward: packed rows (starts) are for training; the KV cache holds one review a row")
            if starts.shape != idx.shape:
                raise ValueError(f"starts shape {tuple(starts.shape)} differs from idx shape {tuple(idx.shape)}")
            if starts.dtype.is_floating_point or starts.dtype == torch.bool:
                raise ValueError(f"starts must be integers (where each position's review begins), got {starts.dtype}")

    def check_row_positions(self, idx, cache, positions):
        if cache is None or idx.shape[1] != 1 or positions.shape != idx.shape[:1] or positions.dtype != torch.long:
            raise ValueError(f"GPT.forward: per-row positions are a LongTensor of shape (B,) for one token a row "
                             f"with a KV cache, got {tuple(positions.shape)} {positions.dtype} for idx "
                             f"{tuple(idx.shape)}{'' if cache is not None else ' without a cache'}")
        if cache.batch_size != idx.shape[0]:
            raise ValueError(f"the KV cache holds {cache.batch_size} sequences, idx {idx.shape[0]}")
        if idx.shape[0] and not 0 <= int(positions.min()) <= int(positions.max()) < self.config.block_size:
            raise ValueError(f"positions {positions.tolist()} are outside block_size {self.config.block_size}")

    @staticmethod
    def positions(idx, start, starts):
        """Each token's position in its review, (B or 1, T)."""
        if isinstance(start, torch.Tensor):
            return start[:, None]
        T = idx.shape[1]
        if starts is None:
            return torch.arange(start, start + T, device=idx.device)[None]
        return torch.arange(T, device=idx.device) - starts

    @staticmethod
    def previous_tokens(idx, cache, start, positions):
        """The token before each of idx's in its review, -1 where a review begins (from the cache with one)."""
        if cache is not None:
            return cache.previous_tokens(idx, start)
        shifted = torch.cat([torch.full_like(idx[:, :1], -1), idx[:, :-1]], dim=1)
        return torch.where(positions == 0, -1, shifted)

    def forward(self, idx, targets=None, cache: KVCache = None, start=0, starts=None):
        """Logits (B, T, vocab) of tokens idx (B, T) at positions start.., and the loss if targets are given.

        Without a cache the tokens are a whole sequence (training, or the no-cache sampler). With one,
        they continue the sequence the cache holds up to `start` (0: a prefill), or, one token a row, each row
        its own sequence up to its own position (start: a LongTensor (B,), the server's running batch). `starts` (B, T) packs
        several reviews into a row: where the review of each token begins; positions restart there and
        attention stays inside each review.
        """
        self.check_inputs(idx, targets, cache, start, starts)
        ops = self.ops
        positions = self.positions(idx, start, starts)
        x = self.transformer.wte(idx)
        if self.rotary is None:
            x = x + self.transformer.wpe(positions)
        if self.bigram is not None:
            x = x + self.bigram(self.previous_tokens(idx, cache, start, positions), idx)
        x = ops.dropout(x, self.config.dropout, self.training)
        angles = self.rotary(positions) if self.rotary is not None else None
        for i, block in enumerate(self.transformer.h):
            x = block(x, ops, None if cache is None else cache.layers[i], start, starts, angles)
        logits = self.lm_head(self.transformer.ln_f(x, ops))
        if self.config.logit_softcap:
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        loss = ops.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, kind: str = "adamw",
                             muon_dtype=torch.bfloat16) -> list:
        """adamw: AdamW for every parameter (weight decay on matrices and embeddings only). muon: Muon for the
        blocks' weight matrices, its update scaled to AdamW's size so that one learning rate serves both,
        and AdamW for the embeddings and every vector; muon_dtype: the dtype of its orthogonalisation
        (mingpt.optim)."""
        if kind not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        hidden = [p for n, p in params if kind == "muon" and n.startswith("transformer.h.") and p.dim() == 2]
        taken = {id(p) for p in hidden}
        decay = [p for _, p in params if p.dim() >= 2 and id(p) not in taken]
        no_decay = [p for _, p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        optimizers = [fused_adamw(groups, lr=learning_rate, betas=betas)]
        if hidden:
            optimizers.append(Muon(hidden, ns_dtype=muon_dtype, lr=learning_rate, weight_decay=weight_decay,
                                   adjust_lr_fn="match_rms_adamw"))
        return optimizers

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size
