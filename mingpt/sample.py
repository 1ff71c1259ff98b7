"""Write reviews: `python -m mingpt.sample --start 好看 --num_samples 10 --max_new_tokens 100`.

Samples print one per line. In the `review` layout each sample is <bos> <sentiment> start...
and stops at its end token; --sentiment auto lets the model draw the sentiment token itself.
"""
import argparse
import sys

import torch

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .hf import is_pretrained_dir, load_pretrained
from .layouts import get_layout
from .sampling import SAMPLERS, resolve_sampler
from .tokenizer import SENTIMENT_TOKENS, UnknownCharacterError


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mingpt.sample", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="out",
                   help="checkpoint file, a directory holding ckpt.pt, or a Hugging Face GPT-2 directory (mingpt.export)")
    p.add_argument("--start", default="", help="text every sample starts with")
    p.add_argument("--sentiment", choices=("auto", "pos", "neg"), default="auto",
                   help="review layout: the sentiment token before --start; auto: the model samples it")
    p.add_argument("--num_samples", type=int, default=10, help="samples to write")
    p.add_argument("--max_new_tokens", type=int, default=100, help="most tokens per sample after the prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest tokens (0/None: all)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--sampler", choices=SAMPLERS, default="auto", help="decode loop")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--verbose", action="store_true", help="say which sampler ran and each sample's sentiment")
    return p


@torch.no_grad()
def draw_sentiments(model, tokenizer, context_id: int, n: int, generator) -> list:
    """Sentiments drawn from the model's own p(<pos>|<neg> given the context token)."""
    names = list(SENTIMENT_TOKENS)
    ids = torch.tensor([tokenizer.token_id(SENTIMENT_TOKENS[s]) for s in names])
    device = model.transformer.wte.weight.device
    logits, _ = model(torch.tensor([[context_id]], device=device))
    probs = logits[0, -1, ids.to(device)].float().softmax(-1).cpu()
    return [names[i] for i in torch.multinomial(probs, n, replacement=True, generator=generator).tolist()]


def write_samples(model, tokenizer, layout, start: str, sentiment: str, num_samples: int,
                  max_new_tokens: int, temperature=0.8, top_k=None, top_p=None, seed=None, sampler="auto"):
    """Returns [(sentiment, text)] for num_samples samples that begin with `start`."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    try:
        start_ids = tokenizer.encode(start)
    except UnknownCharacterError as e:
        raise UnknownCharacterError(f"--start {start!r}: {e}") from None
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    context_id = tokenizer.token_id(layout.context_token)
    sentiments = (draw_sentiments(model, tokenizer, context_id, num_samples, generator)
                  if sentiment == "auto" else [sentiment] * num_samples)
    prompts = [[context_id, tokenizer.token_id(SENTIMENT_TOKENS[s])] + start_ids for s in sentiments]
    if len(prompts[0]) > model.config.block_size:
        raise ValueError(f"--start is {len(start_ids)} tokens; with its 2 prefix tokens it must fit the "
                         f"block of {model.config.block_size}")
    device = model.transformer.wte.weight.device
    idx = torch.tensor(prompts, dtype=torch.long, device=device)
    eos_id = tokenizer.token_id(layout.end_token)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_id=eos_id, seed=seed, sampler=sampler)
    texts = []
    for row in out[:, 2:].tolist():
        if eos_id in row[len(start_ids):]:
            row = row[:row.index(eos_id, len(start_ids))]
        texts.append(tokenizer.decode(row))
    return list(zip(sentiments, texts))


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if is_pretrained_dir(args.ckpt):
            model, tokenizer, data = load_pretrained(args.ckpt, device=args.device, require_tokenizer=True)
        else:
            ckpt = load_checkpoint(args.ckpt)
            model, tokenizer = model_from_checkpoint(ckpt, args.ckpt, device=args.device)
            data = ckpt["data"]
        samples = write_samples(model.eval(), tokenizer, get_layout(data["layout"]),
                                args.start, args.sentiment, args.num_samples, args.max_new_tokens,
                                args.temperature, args.top_k, args.top_p, args.seed, args.sampler)
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    if args.verbose:
        print(f"sampler: {resolve_sampler(args.sampler, model)}; checkpoint {args.ckpt}", file=sys.stderr)
    for sentiment, text in samples:
        print(f"[{sentiment}] {text}" if args.verbose else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
