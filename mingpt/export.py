"""Export a checkpoint for Hugging Face transformers: `python -m mingpt.export --ckpt out --out hf_model`.

The directory loads offline with AutoModelForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR),
and back into mingpt with mingpt.load(DIR) or `python -m mingpt.sample --ckpt DIR`. A GPT-2 model is written as a
GPT2LMHeadModel; one with rotary positions as a GPTNeoXForCausalLM (with layer norms, a GELU or ReLU² MLP, a tied
or untied head); any other architecture option is refused by name.
--verify then compares mingpt with transformers on the exported weights and exits 3 on a mismatch.
Needs the `hf` extra: pip install -e .[hf]
"""
import argparse
import sys

from .checkpoint import CheckpointError, load
from .hf import (ARCHITECTURES, HFFormatError, MissingDependency, compare_with_transformers, export_architecture,
                 require, save_pretrained)
from .ops import BACKENDS
from .sample.engine import SAMPLERS, resolve_sampler

LOGIT_TOLERANCE = 1e-5  # fp32, the bar the export is held to


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mingpt.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out", help="checkpoint file, or a directory holding ckpt.pt")
    p.add_argument("--out", required=True, help="directory to write (created; files in it are overwritten)")
    p.add_argument("--verify", action="store_true",
                   help="print the max logit difference, greedy agreement and tokenizer agreement with transformers")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="mingpt ops backend for --verify")
    p.add_argument("--sampler", choices=SAMPLERS, default="auto", help="mingpt sampler for --verify's greedy runs")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        require("transformers", "tokenizers", "safetensors")
        loaded = load(args.ckpt, backend=args.backend)
        if loaded.checkpoint is None:
            raise HFFormatError(f"{args.ckpt} is a Hugging Face folder already; export takes a mingpt checkpoint")
        save_pretrained(loaded.checkpoint, loaded.model, loaded.tokenizer, args.out)
        print(f"wrote {args.out} ({ARCHITECTURES[export_architecture(loaded.model.config)][0]})")
        if args.verify:
            model, tokenizer = loaded.model, loaded.tokenizer
            r = compare_with_transformers(model, tokenizer, args.out, sampler=args.sampler)
            print(f"max |logit difference| {r['max_logit_diff']:.3g} over {r['logit_prompts']} random prompts "
                  f"of {r['prompt_tokens']} tokens (fp32, backend {model.ops.name}; tolerance {LOGIT_TOLERANCE:g})")
            print(f"fp32 rounding for scale: mingpt fp32 vs mingpt fp64 {r['fp32_error']:.3g}")
            print(f"greedy: {r['greedy_identical']}/{r['greedy_prompts']} prompts token-identical "
                  f"for {r['new_tokens']} new tokens ({resolve_sampler(args.sampler, model)} sampler vs transformers generate)")
            print(f"tokenizer: {r['tokenizer_identical']}/{r['tokenizer_texts']} texts encode and decode alike")
            if not (r["max_logit_diff"] <= LOGIT_TOLERANCE and r["greedy_identical"] == r["greedy_prompts"]
                    and r["tokenizer_identical"] == r["tokenizer_texts"]):
                print("export: verify: mingpt and transformers disagree", file=sys.stderr)
                return 3
    except MissingDependency as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, HFFormatError, ValueError, RuntimeError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
