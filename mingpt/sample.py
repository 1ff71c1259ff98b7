"""Write reviews: `python -m mingpt.sample --start 好看 --num_samples 10 --max_new_tokens 100`.

Samples print one per line. In the `review` layout each sample is <bos> <sentiment> start...
and stops at its end token; --sentiment auto lets the model draw the sentiment token itself.
"""
import argparse
import sys

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .hf import is_pretrained_dir, load_pretrained
from .layouts import get_layout
from .sampling import SAMPLERS, resolve_sampler, write_samples


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
