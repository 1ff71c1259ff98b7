"""The running batch's KV cache and its forward, by backend: the compiled sampler's RunningRows (CPU, float32
weights: the whole step in C++) or the model's own KV-cached forward (any device, any backend's op table).

Both hold `sequences` sequences of up to the model's block and answer the three calls of a step of
mingpt.serve.batch.RunningBatch, each returning the logits (rows, vocab) of each sequence's last token:
  decode(tokens, positions, windows)  sequences 0..len(tokens)-1 each take its token at its own position; a
                                      sequence in `windows` (past the block) re-reads that window from 0 instead
  prefill(first, prompts)             sequences first.. start anew with prompts of one length
  move(sources, targets)              copy sequences' caches (compaction)
"""
import torch

from ..sample.compiled import PARALLEL_MIN_BYTES, cached_sampler_unavailable_reason, packed_sampler

DECODERS = ("auto", "compiled", "model")


class CompiledRows:
    """mingpt._C.RunningRows over the model's packed float32 weights. A window (a block of rows) goes through
    the model's forward instead: the panel kernels are built for a few rows a step, and torch's matrix
    products are faster for 64 (a window of 6x192: 4.9 against 7.5 ms, 2 cores); it needs no cache."""

    name = "compiled"

    def __init__(self, model, sequences: int):
        self.model = model
        sampler = packed_sampler(model, "fp32")
        threads = torch.get_num_threads() if sampler.packed_bytes >= PARALLEL_MIN_BYTES else 1
        self.rows = sampler.running_rows(sequences, threads)

    def decode(self, tokens: list, positions: list, windows: dict) -> torch.Tensor:
        cached = [row for row in range(len(tokens)) if row not in windows]
        if cached:
            decoded = self.rows.forward(cached, [positions[row] for row in cached], [[tokens[row]] for row in cached])
            if not windows:
                return decoded
        logits = torch.empty(len(tokens), self.model.config.vocab_size)
        if cached:
            logits[cached] = decoded
        rows = list(windows)
        logits[rows] = self.model(torch.tensor([windows[row] for row in rows]))[0][:, -1].float()
        return logits

    def prefill(self, first: int, prompts: list) -> torch.Tensor:
        return self.rows.forward(list(range(first, first + len(prompts))), [0] * len(prompts), prompts)

    def move(self, sources: list, targets: list):
        self.rows.move(sources, targets)


class ModelRows:
    """The model's forward over a KVCache: one batched call per step, rows at their own positions."""

    name = "model"

    def __init__(self, model, sequences: int):
        self.model, self.cache = model, model.new_cache(sequences)

    def decode(self, tokens: list, positions: list, windows: dict) -> torch.Tensor:
        device = self.model.device
        logits = self.model(torch.tensor(tokens, device=device)[:, None], cache=self.cache.rows(0, len(tokens)),
                            start=torch.tensor(positions, device=device))[0][:, -1]
        if windows:  # a window's row decoded a stale position above; its logits are the window's
            rows = list(windows)
            logits[rows] = self.model(torch.tensor([windows[row] for row in rows], device=device))[0][:, -1]
        return logits

    def prefill(self, first: int, prompts: list) -> torch.Tensor:
        return self.model(torch.tensor(prompts, device=self.model.device),
                          cache=self.cache.rows(first, first + len(prompts)))[0][:, -1]

    def move(self, sources: list, targets: list):
        self.cache.move_rows(sources, targets)


def running_rows(model, sequences: int, decoder: str = "auto"):
    """The backend `decoder` names (auto: compiled where it runs, on the CPU with float32 weights, else model)."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    reason = cached_sampler_unavailable_reason(model)
    if reason is None and model.device.type != "cpu":
        reason = f"the compiled sampler runs on the CPU, and the model is on {model.device}"
    if decoder == "compiled" and reason is not None:
        raise ValueError(f"the compiled decoder cannot run: {reason}")
    if decoder == "model" or reason is not None:
        return ModelRows(model, sequences)
    return CompiledRows(model, sequences)
